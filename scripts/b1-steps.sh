#!/usr/bin/env bash
# Issue 11, B=1 4k on the 8B shape: whether KIVI-2's and QJL's extra step time over fp16 comes every step
# or with the block seals (one step in 32), and what dependent launches and the fused ring append do to
# it. One call on a fresh machine, carry [".carry-peers", ".carry-bin"]:
#   1. while the 8B GGUF is written (CPU): attention alone (`kvq-gpu bench`) at 4064 tokens (whole
#      blocks) and 4080 (16 in the f16 tail), REPS rounds;
#   2. `kvq bench decode --chained` at B=1 4k, 64 timed steps, each step's GPU time (gpu_ms_each_step),
#      with the defaults, KVQ_PDL=0, KVQ_PDL_ALL=0 (only the GEMVs dependent) and KVQ_FUSED_APPEND=0;
#      scripts/step_times.py summarises;
#   3. unless LLAMA=0: llama.cpp f16 at the same point (built at nice 19 from the start).
# Leaves $OUT/b1-steps.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
cp -r .carry-peers/. "$S"/
R=$OUT/b1-steps; mkdir -p "$R"; big=$S/llama3-8b-f16.gguf
PLANS=${PLANS:-"fp16 kivi:bits=2,window=0 kivi:bits=4,window=0 qjl:m=256,m0=256,buffer=128"}
save() { rm -f "$R"/*.png; tar czf "$OUT/b1-steps.tar.gz" -C "$OUT" b1-steps; }
[ "${LLAMA:-1}" = 1 ] && start_build 19
gguf_in_background llama3-8b "$big" "$S/tokenizer.gguf"
touch "$R/attn.jsonl"
for i in $(seq 1 "${REPS:-2}"); do  # REPS=0: no attention-alone stage
  # shellcheck disable=SC2086
  KVQ_BENCH_POINTS=1x4064,1x4080 timeout 60 "$S/kvq-gpu" bench $PLANS 2>>"$R/attn.err" \
    | sed "s/^{/{\"rep\":$i,/" >> "$R/attn.jsonl"
done
python3 scripts/attn_medians.py "$R/attn.jsonl" context | tee "$R/attn.txt"
save
wait_gguf 240 | tail -n 1
kv=(); for p in $PLANS; do kv+=(--kv "$p"); done
for v in ${VARIANTS:-default pdl0 pdlall0 fused0}; do
  ( case $v in pdl0) export KVQ_PDL=0;; pdlall0) export KVQ_PDL_ALL=0;; fused0) export KVQ_FUSED_APPEND=0;; esac
    timeout 150 "$S/kvq" bench decode --chained --model "$big" --ctx 4096 --batch 1 --steps 64 "${kv[@]}" \
      --json "$R/step-$v.json" > "$R/step-$v.log" 2>&1 )
  echo "== steps, $v"; python3 scripts/step_times.py "$R/step-$v.json" | tee "$R/step-$v.txt"
  save
done
if [ "${LLAMA:-1}" = 1 ]; then
  wait_build 200
  llama_bench "$big" f16 4096 "$R/llama-f16.jsonl" 1 | cut -c1-240
  save
fi
