#!/usr/bin/env bash
# QJL's sketched queries formed once per launch (kvq_qjl_sketch) instead of in every split CTA, and
# RVQ's swizzled codebooks: parity, attention A/B against the previous build, and issue 11's B=1 4k
# step against llama.cpp f16, in one call on a fresh machine. Built here first (README "GPU runs"):
#   kvq and kvq-gpu of this tree in .carry-bin/*.xz, the previous kvq-gpu in .carry-bin-old/kvq-gpu.xz;
#   carry [".carry-bin", ".carry-bin-old", ".carry-peers"].
#   1. (CPU, background) llama.cpp built at nice 19; the 8B-shape GGUF written;
#   2. `kvq-gpu check` (every kernel against its CPU reference), and the QJL cases again with
#      KVQ_QUERY_SKETCH=0 (the per-CTA path kept as the fallback);
#   3. attention alone, interleaved twice: this build, this build with KVQ_QUERY_SKETCH=0, the previous
#      build; fp16, QJL (issue 11's plan and `buffer=0`), RVQ 256x8 (the parity run's synthetic books);
#      B=1 4k and B=8 128k; the copy bandwidth of the same run;
#   4. `kvq bench decode --chained`, 8B shape, B=1 4k, 64 steps: fp16 and QJL, sketch on and off;
#   5. llama.cpp f16 at the same point.
# Leaves $OUT/qjl-sketch.tar.gz after every stage.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
cp -r .carry-peers/. "$S"/
R=$OUT/qjl-sketch; mkdir -p "$R"; big=$S/llama3-8b-f16.gguf
save() { tar czf "$OUT/qjl-sketch.tar.gz" -C "$OUT" qjl-sketch; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
start_build 19
gguf_in_background llama3-8b "$big" "$S/tokenizer.gguf"

timeout 200 "$S/kvq-gpu" check > "$R/check.txt" 2>&1; echo "check rc=$?"
grep -E "^FAIL|^parity" "$R/check.txt" | head
KVQ_QUERY_SKETCH=0 KVQ_CHECK_FILTER=qjl timeout 100 "$S/kvq-gpu" check > "$R/check-qjl-nosketch.txt" 2>&1
echo "check (qjl, KVQ_QUERY_SKETCH=0) rc=$?"; grep -E "^FAIL|^parity" "$R/check-qjl-nosketch.txt" | head
save

mkdir -p /root/stash-old && xz -dc .carry-bin-old/kvq-gpu.xz > /root/stash-old/kvq-gpu && chmod +x /root/stash-old/kvq-gpu
CB=${TMPDIR:-/tmp}/kvq-check-rvq-256x8.safetensors
F="fp16 qjl:m=256,m0=256,buffer=128 qjl:m=256,m0=256,buffer=0 rvq:codes=256,depth=8,window=0,codebooks=$CB"
for i in 1 2; do
  for v in new nosketch old; do
    bin=$S/kvq-gpu; [ $v = old ] && bin=/root/stash-old/kvq-gpu
    ( [ $v = nosketch ] && export KVQ_QUERY_SKETCH=0
      # shellcheck disable=SC2086
      KVQ_BENCH_POINTS=${AB_POINTS:-1x4096,8x131072} timeout 120 "$bin" bench $F 2>> "$R/ab.err" \
        | sed "s/^{/{\"build\":\"$v\",\"rep\":$i,/" >> "$R/ab.jsonl" )
  done
done
python3 scripts/sdpa_bench.py --copy-only >> "$R/ab.jsonl" 2>> "$R/ab.err"
python3 scripts/ab_report.py "$R/ab.jsonl" | tee "$R/ab.txt"
save

wait_gguf 240 | tail -n 1
for v in default nosketch; do
  ( [ $v = nosketch ] && export KVQ_QUERY_SKETCH=0
    timeout 150 "$S/kvq" bench decode --chained --model "$big" --ctx 4096 --batch 1 --steps 64 \
      --kv fp16 --kv qjl:m=256,m0=256,buffer=128 --json "$R/step-$v.json" > "$R/step-$v.log" 2>&1 )
  echo "== steps, $v"; python3 scripts/step_times.py "$R/step-$v.json" | tee "$R/step-$v.txt"
  save
done
wait_build 200
llama_bench "$big" f16 4096 "$R/llama-f16.jsonl" 1 | cut -c1-240
save
