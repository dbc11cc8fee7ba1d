#!/usr/bin/env bash
# Runs ON the GPU machine (no Rust there) over the kvq-gpu binary built here and carried in .carry/:
#   cargo build --release -p kvq --bin kvq-gpu && mkdir -p .carry && cp target/release/kvq-gpu .carry/
#   device run: carry [".carry"], command "bash scripts/gpu-engine-check.sh"
# Checks the GPU engine: every model-op kernel and the GEMM vs a CPU computation on random data, greedy
# generation (32 tokens, teacher-forced logits and free-running tokens) vs kvq-model's CPU path on tiny
# random models (HF rotate-half and GGUF interleaved RoPE) and on the real model, then decode tokens/s.
#
# The real model (98 MB) is over the 64 MiB carry limit: split it here and carry it over two calls
# (the device keeps ignored files between calls while it stays warm):
#   mkdir -p .carry-m1 .carry-m2 && split -n 2 -d models/SmolLM2-135M-Instruct.Q4_1.gguf model.part.
#   mv model.part.00 .carry-m1/ && mv model.part.01 .carry-m2/
#   call 1: carry [".carry-m1"], command "bash scripts/gpu-engine-check.sh --stage-only"
#   call 2: carry [".carry", ".carry-m2"], command "bash scripts/gpu-engine-check.sh"
# Without the model the real-model part prints SKIPPED. Logs land in $OUT.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
stage_model
[ "${1:-}" = "--stage-only" ] && exit 0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
bin=.carry/kvq-gpu
echo "== engine-check"; timeout 500 $bin engine-check 2>&1 | tee "$OUT/engine-check.txt"; rc=${PIPESTATUS[0]}
if [ "${SANITIZE:-0}" = 1 ]; then
  echo "== compute-sanitizer memcheck (engine-check)"; timeout 500 compute-sanitizer --tool memcheck --error-exitcode 9 $bin engine-check >"$OUT/engine-memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -n 3 "$OUT/engine-memcheck.txt"
fi
grep -E "^(FAIL|SKIPPED|decode:|engine-check:)" "$OUT/engine-check.txt"
exit $rc
