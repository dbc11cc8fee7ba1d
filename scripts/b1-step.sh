#!/usr/bin/env bash
# Batch-1 decode steps (issue 11's B=1 target, issue 5's B=1 4k ratio): checks of the fused GEMV
# (RMSNorm / SwiGLU folded in) and of the fused split merge, then the same run's timings of the
# variants: GEMV on/off x the fewest tokens per decode split (KVQ_SPLIT_TOKENS; 1 = the earlier sizing),
# whole steps of a random model of SmolLM2-135M's shape and the attention micro-benchmark at 32/8 heads,
# d=128, and the per-kernel profile of one variant (ncu). One call, carry [".carry-bin"]:
#   bash scripts/b1-step.sh
# Everything lands in $OUT/b1.tar.gz (the device returns a few files only).
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R="$OUT/r"; mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
KVQ_GEMV=1 timeout 90 "$S/kvq-gpu" engine-check > "$R/engine.txt" 2>&1; echo "engine-check (GEMV on) rc=$?"
grep -E "^FAIL|folded|checks" "$R/engine.txt" | cut -c1-170
KVQ_GEMV=1 timeout 90 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check (GEMV on) rc=$?"
grep -E "^FAIL|graphs vs|replayed" "$R/resident.txt" | cut -c1-170
timeout 300 "$S/kvq-gpu" check > "$R/check.txt" 2>&1; echo "check rc=$?"; grep -E "^FAIL|^parity" "$R/check.txt" | head
"$S/kvq-gpu" random-model /tmp/rm135 > /dev/null
for g in 0 1; do for t in 1 256 1024; do
  env KVQ_GEMV=$g KVQ_SPLIT_TOKENS=$t timeout 60 "$S/kvq" bench decode --model /tmp/rm135 \
    --name "random SmolLM2-135M shape, KVQ_GEMV=$g KVQ_SPLIT_TOKENS=$t" --ctx 4096,32768 --batch 1,8 --steps 32 \
    --json "$R/bench-g$g-t$t.json" --kv fp16 --kv kivi:bits=2,window=0 --kv asymkv:lk=0,lv=0,window=0 \
    > "$R/bench-g$g-t$t.log" 2>&1
  grep "T=" "$R/bench-g$g-t$t.log" | sed "s/^/GEMV=$g split>=$t /" | cut -c1-130
done; done
F="fp16 kivi:bits=4,window=0 kivi:bits=2,window=0 asymkv:lk=1,lv=0,window=0 decoquant:bits=4,chunk=256 qjl:m=256,m0=256,buffer=0"
for t in 1 256 1024; do
  KVQ_SPLIT_TOKENS=$t KVQ_BENCH_POINTS=1x4096,1x32768,8x131072 timeout 120 "$S/kvq-gpu" bench $F > "$R/attn-t$t.jsonl" 2> "$R/attn-t$t.err"
  echo "attention split>=$t rc=$?"; cat "$R/attn-t$t.jsonl"
done
KVQ_GEMV=1 timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  "$S/kvq" bench decode --model /tmp/rm135 --ctx 4096 --batch 1 --steps 6 --warmup 2 --kv fp16 \
  --json "$R/ncu-b.json" > "$R/ncu-fp16.csv" 2> "$R/ncu-fp16.err"
echo "ncu rc=$?"; python3 scripts/ncu_steps.py "$R/ncu-fp16.csv" 6 | tee "$R/steps-fp16.txt"
rm -f "$R"/*.png
tar czf "$OUT/b1.tar.gz" -C "$OUT" r && rm -rf "$R"
