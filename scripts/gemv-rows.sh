#!/usr/bin/env bash
# The row-major decode GEMV (kernels/model.cu, weights [out][inp]) on a fresh machine, in one call:
# engine-check (every op and GEMM shape vs the CPU, the fused RMSNorm/SwiGLU GEMVs vs the separate
# kernels, tiny models vs kvq-model), resident-check (also chained vs step-by-step greedy tokens),
# gemm-bench (the GEMV vs cuBLAS on the 8B shapes and a 32-layer chain), then `bench decode` on the
# random Llama-3-8B-shape f16 GGUF (written here meanwhile, about 170 s): fp16 and KIVI-2 at B=1/8 x
# 4k/32k one step at a time and chained, the GEMV's rows per warp fixed at 1 and 2 and cuBLAS
# (KVQ_GEMV=0) at B=1, the previous build's binaries (.carry-bin-prev/kvq-prev.xz, optional: the
# column-tile GEMV over [inp][out] weights) at B=1/8, and llama.cpp f16 at the same points (built here
# in the background), so every ratio comes from this call; compute-sanitizer memcheck of engine-check
# last if time is left. Carry [".carry-bin", ".carry-peers"] (and ".carry-bin-prev").
# Results: $OUT/rows.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R=$OUT/rows; mkdir -p "$R"
big=$S/llama3-8b-f16.gguf
gguf_in_background llama3-8b "$big"
cp -r .carry-peers/. "$S"/
start_build 15
save() { tar czf "$OUT/rows.tar.gz" -C "$OUT" rows; }
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s]"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 200 "$S/kvq-gpu" engine-check > "$R/engine-check.txt" 2>&1; echo "engine-check rc=$? $(el)"
grep -E "^(FAIL|engine-check:)" "$R/engine-check.txt" | cut -c1-220 | head -12; grep -c "^PASS" "$R/engine-check.txt"
grep -E "gemm|gemv" "$R/engine-check.txt" | cut -c1-160 | head -40
timeout 90 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check rc=$? $(el)"
grep -E "^FAIL" "$R/resident.txt" | cut -c1-220 | head; grep -c "^PASS" "$R/resident.txt"; grep "chained" "$R/resident.txt" | cut -c1-200 | head -3; save
timeout 150 "$S/kvq-gpu" gemm-bench > "$R/gemm-bench.txt" 2>&1; echo "gemm-bench rc=$? $(el)"; cat "$R/gemm-bench.txt"; save
wait_gguf 180
[ -f .carry-bin-prev/kvq-prev.xz ] && xz -dc .carry-bin-prev/kvq-prev.xz > "$S/kvq-prev" && chmod +x "$S/kvq-prev"
bd() {  # name, json, extra args... (KVQ_BIN picks another binary)
  local name=$1 json=$2; shift 2
  timeout 150 "${KVQ_BIN:-$S/kvq}" bench decode --model "$big" --name "Llama-3-8B shape, random f16 ($name)" --steps 32 --json "$R/$json.json" "$@" > "$R/$json.log" 2>&1
  echo "== $name rc=$? $(el)"; grep "T=" "$R/$json.log" | sed 's/ graph nodes//; s/  */ /g' | cut -c1-200; save
}
bd "sync steps" bench-sync --ctx 4096,32768 --batch 1,8 --kv fp16 --kv kivi:bits=2,window=0
bd "chained steps" bench-chained --ctx 4096,32768 --batch 1,8 --kv fp16 --kv kivi:bits=2,window=0 --chained
[ -x "$S/kvq-prev" ] && KVQ_BIN=$S/kvq-prev bd "previous build, sync steps" bench-prev --ctx 4096,32768 --batch 1,8 --kv fp16
KVQ_GEMV_RPW=1 bd "GEMV 1 row per warp" bench-rpw1 --ctx 4096 --batch 1 --kv fp16
KVQ_GEMV=0 bd "cuBLAS GEMMs" bench-cublas --ctx 4096 --batch 1 --kv fp16
bd "sync steps, again" bench-sync2 --ctx 4096 --batch 1 --kv fp16
wait_build 300; tail -n 2 "$S/llama-build.log"
[ -x "$LB/llama-batched-bench" ] && llama_bench "$big" f16 4096,32768 "$R/llama-f16.jsonl" 1 8 | cut -c1-300
echo "$(el)"; save
left=$(( 560 - ($(date +%s) - t0) ))
if [ $left -gt 60 ]; then
  timeout $left compute-sanitizer --tool memcheck --error-exitcode 9 "$S/kvq-gpu" engine-check > "$R/engine-memcheck.txt" 2>&1
  echo "memcheck rc=$? $(el)"; tail -n 3 "$R/engine-memcheck.txt"; save
fi
