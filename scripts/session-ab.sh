#!/usr/bin/env bash
# One device call after host-side launch changes: parity and the attention A/B of this build against
# .carry-bin-old*/ (verify-gpu.sh ab), QJL's B=1 4k time under fixed split lengths against the default
# rule, and the 8B shape's decode GEMMs under the GEMV's wave-filling split rule against the earlier
# one (KVQ_GEMV_WAVES=0), every ratio within this run. Carry [".carry-bin-gpu", ".carry-bin-old"].
#   AB_POINTS=8x131072,1x4096 bash scripts/session-ab.sh
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R="$OUT/extra"; mkdir -p "$R"
bash "$(dirname "$0")/verify-gpu.sh" ab
echo "== QJL split lengths (B=1, 4k)"
split_sweep 3 "default 128 256 512" "$R/qjl-split.jsonl" fp16 qjl:m=256,m0=256,buffer=0
cat "$R/qjl-split.jsonl" | cut -c1-200
echo "== GEMV split rules"
for wv in 1 0; do
  echo "KVQ_GEMV_WAVES=$wv" >> "$R/gemm.txt"
  KVQ_GEMV_WAVES=$wv timeout 120 "$S/kvq-gpu" gemm-bench >> "$R/gemm.txt" 2>&1
done
cat "$R/gemm.txt"
