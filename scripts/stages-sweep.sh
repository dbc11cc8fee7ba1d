#!/usr/bin/env bash
# Short-context decode attention vs pipeline stages (KVQ_STAGES: fewer stages, more CTAs per SM) and
# split size (KVQ_SPLIT_TOKENS), in one run: the attention micro-benchmark (32/8 heads, d=128) at
# B=1 4k/32k and B=8 128k, and whole B=1 steps of a random 135M-shape model. Carry [".carry-bin"].
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R="$OUT/s"; mkdir -p "$R"
for st in 4 2 1; do for t in 64 256; do
  KVQ_STAGES=$st KVQ_SPLIT_TOKENS=$t KVQ_BENCH_POINTS=1x4096,1x32768,8x131072 timeout 60 "$S/kvq-gpu" bench fp16 kivi:bits=2,window=0 \
    > "$R/attn-s$st-t$t.jsonl" 2>&1
  echo "stages<=$st split>=$t: $(grep -o '"format":"[^"]*","batch":[0-9]*,"context":[0-9]*,"ms":[0-9.]*' "$R/attn-s$st-t$t.jsonl" | sed 's/"format"://; s/"batch"://; s/"context"://; s/"ms"://' | tr '\n' ' ')"
done; done
"$S/kvq-gpu" random-model /tmp/rm135 > /dev/null
for st in 4 2 1; do
  KVQ_STAGES=$st timeout 40 "$S/kvq" bench decode --model /tmp/rm135 --ctx 4096,32768 --batch 1 --steps 32 \
    --kv fp16 --kv kivi:bits=2,window=0 --json "$R/step-s$st.json" > "$R/step-s$st.log" 2>&1
  grep "T=" "$R/step-s$st.log" | sed "s/^/stages<=$st /" | cut -c1-110
done
rm -f "$R"/*.png; tar czf "$OUT/stages.tar.gz" -C "$OUT" s && rm -rf "$R"
