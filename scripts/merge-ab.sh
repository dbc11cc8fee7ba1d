#!/usr/bin/env bash
# One device call after a change to the decode kernels' split merge (kernels/include/kvq_decode.cuh,
# merge_cta): parity of this build, attention A/B against the build carried in .carry-bin-old/ at
# B=1 4k, B=1 32k and B=8 128k for every format, B=1 4k under fixed split lengths (does a cheaper merge
# move the best split? SPLIT_SWEEP=1), the engine's tiny-model checks, then the 8B shape end to end against llama.cpp
# in the same call (bench-gpu.sh big-all; llama.cpp builds and the 8B GGUF is written in the background
# from the start); FUSED_AB=1 (default) also times decode steps with the QKV split writing the cache's
# rings against the append kernel. Every ratio within this run.
#   carry [".carry-peers", ".carry-bin", ".carry-bin-old"]
#   export LLAMA_TYPES='f16 q4_0' KVQ_BENCH_EXTRA=--chained GEMV_TOO=0; bash scripts/merge-ab.sh
set -uo pipefail
here=$(dirname "$0")
. "$here/device-common.sh"
[ -d .carry-peers ] && cp -r .carry-peers/. "$S"/
if [ "${BIG:-1}" = 1 ]; then
  start_build 19
  [ -f "$S/llama3-8b-f16.gguf" ] || gguf_in_background llama3-8b "$S/llama3-8b-f16.gguf" "$S/tokenizer.gguf"
fi

CB=${TMPDIR:-/tmp}/kvq-check-rvq-256x8.safetensors
export AB_POINTS=${AB_POINTS:-1x4096,1x32768,8x131072}
export AB_FORMATS=${AB_FORMATS:-"fp16 kivi:bits=4,window=0 kivi:bits=2,window=0 kivi:bits=2 asymkv:lk=1,lv=0,window=0 kivi:bits=1,window=0 decoquant:bits=4,chunk=256 qjl:m=256,m0=256,buffer=0 rvq:codes=256,depth=8,window=0,codebooks=$CB"}
bash "$here/verify-gpu.sh" ab | grep -E "FAIL|parity" | head

R="$OUT/extra"; mkdir -p "$R"
if [ "${SPLIT_SWEEP:-0}" = 1 ]; then
  echo "== split lengths at B=1 4k (this build)"
  split_sweep 2 "default 64 128 256 512" "$R/split.jsonl" fp16 kivi:bits=2,window=0 qjl:m=256,m0=256,buffer=0 \
    "rvq:codes=256,depth=8,window=0,codebooks=$CB"
  cut -c1-160 "$R/split.jsonl"
fi
echo "== engine-check and resident-check (tiny models)"
timeout 150 "$S/kvq-gpu" engine-check > "$R/engine.txt" 2>&1; echo "engine-check rc=$?"
grep -E "FAIL|checks" "$R/engine.txt" | head -n 12
timeout 150 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check rc=$?"
grep -E "FAIL|failures|generate" "$R/resident.txt" | head -n 20
# MEMCHECK_FILTER: compute-sanitizer memcheck on the parity cases whose name contains it (e.g. the
# multi-split ones, "T=[4133]", which take the fused merge).
if [ -n "${MEMCHECK_FILTER:-}" ]; then
  check_under memcheck "$MEMCHECK_FILTER" "${MEMCHECK_TIMEOUT:-150}" "$R/memcheck.txt"
  grep -E "^parity" "$R/memcheck.txt" | tail -n 1
fi
# The QKV split writing K/V into the rings (default) against the append kernel (KVQ_FUSED_APPEND=0):
# decode steps of a random SmolLM2-135M-shape model (a small model's step is its kernels' latencies),
# alternating, two reps each.
if [ "${FUSED_AB:-1}" = 1 ]; then
  echo "== fused append A/B (random 135M shape)"
  "$S/kvq-gpu" random-model /tmp/rm135 > /dev/null
  for i in 1 2; do for f in 1 0; do
    KVQ_FUSED_APPEND=$f timeout 90 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model /tmp/rm135 \
      --name "random SmolLM2-135M shape, KVQ_FUSED_APPEND=$f" --ctx "${FUSED_CTX:-4096}" --batch 1,8 --steps 32 \
      --json "$R/fused-$f-$i.json" --kv fp16 --kv kivi:bits=2,window=0 --kv kivi:bits=2 > "$R/fused-$f-$i.log" 2>&1
    grep "T=" "$R/fused-$f-$i.log" | sed "s/^/fused=$f rep $i /" | cut -c1-140
  done; done
  rm -f "$R"/*.png
fi
tar czf "$OUT/extra.tar.gz" -C "$R" . && rm -rf "$R"

# BIG=0 stops here (e.g. on an H200, when issue 11's H100 comparison is left for a later call).
[ "${BIG:-1}" = 1 ] || exit 0
export KVQ_PLANS_BIG=${KVQ_PLANS_BIG:-"kivi:bits=4,window=0 kivi:bits=2 kivi:bits=2,window=0 asymkv:lk=32,lv=0,window=0 asymkv:lk=0,lv=0,window=0 decoquant:bits=4,chunk=256 qjl:m=256,m0=256,buffer=128"}
bash "$here/bench-gpu.sh" big-all
