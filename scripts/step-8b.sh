#!/usr/bin/env bash
# Where an 8B-shape decode step goes (issue 11's B=1 gap to llama.cpp): Nsight Compute's
# gpu__time_duration per kernel over decode steps of the random Llama-3-8B-shape f16 GGUF at B=1, 4k
# (fp16 and KIVI-2 caches), then step times with every kernel a programmatic dependent
# (KVQ_PDL_ALL=1) against the default in the same call. One call on a fresh machine,
# carry [".carry-peers", ".carry-bin"] (the 8B GGUF is written there from .carry-peers/tokenizer.gguf).
# Leaves $OUT/step-8b.tar.gz: ncu CSVs, per-kernel summaries (scripts/ncu_steps.py), bench JSON/logs.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
big=$S/llama3-8b-f16.gguf; R=$OUT/step-8b; mkdir -p "$R"
random_gguf llama3-8b "$big"
STEPS=${STEPS:-3}
for kv in ${PROFILE_PLANS:-fp16 kivi:bits=2,window=0}; do
  tag=$(echo "$kv" | tr ":=," "___")
  timeout 200 "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$S/kvq" bench decode --model "$big" --ctx 4096 --batch 1 --steps "$STEPS" --warmup 1 --kv "$kv" \
    --json "$R/ncu-$tag.json" > "$R/ncu-$tag.csv" 2> "$R/ncu-$tag.err"
  echo "== ncu $kv rc=$? ($(grep -c gpu__time_duration "$R/ncu-$tag.csv") kernel rows)"
  python3 scripts/ncu_steps.py "$R/ncu-$tag.csv" "$STEPS" | tee "$R/steps-$tag.txt" | head -n 16
done
rm -f "$R"/*.png "$R"/ncu-*.json
tar czf "$OUT/step-8b.tar.gz" -C "$OUT" step-8b
# Step times, default vs KVQ_PDL_ALL=1, alternating, same points.
for rep in 1 2; do
  for v in default pdl_all; do
    env $( [ $v = pdl_all ] && echo KVQ_PDL_ALL=1 ) timeout 150 "$S/kvq" bench decode --model "$big" --ctx 4096,32768 --batch 1,8 \
      --steps 32 --kv fp16 --kv kivi:bits=2,window=0 --json "$R/ab-$v-$rep.json" > "$R/ab-$v-$rep.log" 2>&1
    echo "== $v rep $rep rc=$?"; grep "T=" "$R/ab-$v-$rep.log" | sed 's/ (.*nodes)//' | cut -c1-110
  done
done
rm -f "$R"/*.png
tar czf "$OUT/step-8b.tar.gz" -C "$OUT" step-8b && rm -rf "$R"
