#!/usr/bin/env bash
# Issue 11, B=1 4k on the 8B shape: where KIVI-2's and QJL's decode steps lose to fp16 (run 24, same call:
# fp16 6.053 ms, KIVI-2 6.180, QJL 6.466; llama.cpp f16 6.092). One call on a fresh machine, carry
# [".carry-peers", ".carry-bin"]:
#   1. while the 8B GGUF is written (CPU): attention alone at B=1 4k per decode split length
#      (split_sweep: `kvq-gpu bench`, 32/8 heads, d=128), 2 rounds;
#   2. whole steps at B=1 4k, chained, the built-in split rule against KVQ_SPLIT_TOKENS=$AB_SPLIT, and
#      llama.cpp f16 at the same point in the same call (its build runs at nice 19 from the start);
#   3. Nsight Compute's per-kernel time over NCU_STEPS (33: a whole 32-token block cycle, so the step that
#      seals a block is in) decode steps of NCU_PLANS (scripts/ncu_steps.py).
# Leaves $OUT/b1-gap.tar.gz (refreshed after each stage).
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
cp -r .carry-peers/. "$S"/
R=$OUT/b1-gap; mkdir -p "$R"; big=$S/llama3-8b-f16.gguf
PLANS=${PLANS:-"fp16 kivi:bits=2,window=0 kivi:bits=4,window=0 qjl:m=256,m0=256,buffer=128"}
AB_SPLIT=${AB_SPLIT:-128}
save() { tar czf "$OUT/b1-gap.tar.gz" -C "$OUT" b1-gap; }
# LLAMA=0: no llama.cpp build or run (a diagnosis-only call, about 150 s shorter)
[ "${LLAMA:-1}" = 1 ] && start_build 19
gguf_in_background llama3-8b "$big" "$S/tokenizer.gguf"
# shellcheck disable=SC2086
split_sweep 2 "${SPLITS:-default 64 128 256 512}" "$R/split.jsonl" $PLANS
python3 scripts/attn_medians.py "$R/split.jsonl" split | tee "$R/split.txt"
save
wait_gguf 240 | tail -n 1
kv=(); for p in $PLANS; do kv+=(--kv "$p"); done
for v in default "$AB_SPLIT"; do
  ( [ "$v" = default ] || export KVQ_SPLIT_TOKENS=$v
    timeout 150 "$S/kvq" bench decode --chained --model "$big" --ctx 4096 --batch 1 --steps 32 "${kv[@]}" \
      --json "$R/step-$v.json" > "$R/step-$v.log" 2>&1 )
  echo "== steps, split $v"; grep "T=" "$R/step-$v.log" | sed 's/ (.*nodes)//' | cut -c1-120
done
rm -f "$R"/*.png; save
if [ "${LLAMA:-1}" = 1 ]; then
  wait_build 200
  llama_bench "$big" f16 4096 "$R/llama-f16.jsonl" 1 | cut -c1-240
  save
fi
for kv in ${NCU_PLANS:-kivi:bits=2,window=0 qjl:m=256,m0=256,buffer=128 fp16}; do
  tag=$(echo "$kv" | tr ":=," "___")
  # (--no-baseline: this plan's steps alone; run 26 lost most of its profile to the fp16 steps first)
  timeout "${NCU_TIMEOUT:-100}" "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$S/kvq" bench decode --no-baseline --model "$big" --ctx 4096 --batch 1 --steps "${NCU_STEPS:-33}" --warmup 1 --kv "$kv" \
    --json "$R/ncu-$tag.json" > "$R/ncu-$tag.csv" 2> "$R/ncu-$tag.err"
  echo "== ncu $kv rc=$?"
  python3 scripts/ncu_steps.py "$R/ncu-$tag.csv" "${NCU_STEPS:-33}" | tee "$R/steps-$tag.txt" | head -n 12
done
rm -f "$R"/*.png "$R"/ncu-*.json; save
