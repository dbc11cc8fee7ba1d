#!/usr/bin/env bash
# The decode GEMV's staging batch (KVQ_GEMV_STAGE = 1, 2, 4: input vectors a thread loads before it stores
# any, at 4, 3 and 2 CTAs per SM), in one short call: the GEMM/GEMV op checks of each variant
# (engine-check), `kvq-gpu gemm-bench` of each (the 8B shapes at 1 and 2 rows, 32-layer chains; plain f16
# input), then whole B=1 decode steps of a random Llama-3.2-1B-shape f16 GGUF written here (the RMSNorm
# and SwiGLU staging modes run only in steps) in the order 1, 2, 4, 1. Carry [".carry-bin",
# ".carry-peers-small"]. Results: $OUT/stage.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R=$OUT/stage; mkdir -p "$R"
g=$S/llama3.2-1b-f16.gguf
gguf_in_background llama3.2-1b "$g"
save() { tar czf "$OUT/stage.tar.gz" -C "$OUT" stage; }
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s]"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for v in 1 2 4; do
  KVQ_GEMV_STAGE=$v timeout 60 "$S/kvq-gpu" engine-check > "$R/engine-check-s$v.txt" 2>&1; echo "engine-check stage $v rc=$? $(el)"
  grep -E "^FAIL|gemv" "$R/engine-check-s$v.txt" | cut -c1-150
done
save
for v in 1 2 4; do
  KVQ_GEMV_STAGE=$v timeout 60 "$S/kvq-gpu" gemm-bench > "$R/gemm-bench-s$v.txt" 2>&1; echo "gemm-bench stage $v rc=$? $(el)"
  grep -E "^\| [12] |chain" "$R/gemm-bench-s$v.txt"; save
done
wait_gguf 80
k=0
for v in 1 2 4 1; do
  k=$((k + 1))
  KVQ_GEMV_STAGE=$v timeout 60 "$S/kvq" bench decode --model "$g" --name "Llama-3.2-1B shape, random f16 (stage $v)" --ctx 4096 --batch 1,2 \
    --steps 48 --kv fp16 --json "$R/bench-$k-s$v.json" > "$R/bench-$k-s$v.log" 2>&1
  echo "== bench stage $v rc=$? $(el)"; grep "T=" "$R/bench-$k-s$v.log" | sed 's/ graph nodes//; s/  */ /g' | cut -c1-160; save
done
