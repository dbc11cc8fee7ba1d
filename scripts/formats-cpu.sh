#!/usr/bin/env bash
# The CPU side of verify-gpu.sh's `formats` stage: the same greedy generations on the CPU path, to set
# the GPU's tokens against. Usage: bash scripts/formats-cpu.sh OUT_DIR (kvq built in target/release).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: formats-cpu.sh OUT_DIR}; mkdir -p "$out"
. scripts/formats-plans.sh
: > "$out/generate-cpu.txt"
for kv in "${GEN_PLANS[@]}"; do
  echo "== $kv" >> "$out/generate-cpu.txt"
  target/release/kvq generate --device cpu --kv "$kv" --max-tokens 32 "$PROMPT" >> "$out/generate-cpu.txt" \
    2>> "$out/generate-cpu.err"
  echo >> "$out/generate-cpu.txt"
done
