#!/usr/bin/env bash
# Per-kernel GPU time of decode steps (Nsight Compute, one metric: gpu__time_duration), to see where a
# B=1 step's time goes: kernel durations vs launch gaps. Carry [".carry-bin"]; runs on a random model of
# SmolLM2-135M's shape (kvq-gpu random-model), so no model carry is needed.
#   bash scripts/profile-step.sh            fp16 and KIVI-2 at 4k, batch 1
# Leaves $OUT/ncu-<plan>.csv (raw) and prints per kernel: launches per step, mean us, share of the step.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
"$S/kvq-gpu" random-model /tmp/rm135 >/dev/null
STEPS=${STEPS:-6}
for kv in fp16 "kivi:bits=2,window=0"; do
  tag=$(echo "$kv" | tr ":=," "___")
  # --steps counts the timed steps; the step kernels are the last ones launched, so profile them all.
  timeout 240 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$S/kvq" bench decode --model /tmp/rm135 --ctx 4096 --batch 1 --steps "$STEPS" --warmup 2 --kv "$kv" \
    --json "$OUT/b-$tag.json" > "$OUT/ncu-$tag.csv" 2> "$OUT/ncu-$tag.err"
  echo "== $kv rc=$? ($(grep -c gpu__time_duration "$OUT/ncu-$tag.csv") kernel rows)"
  grep "T=" "$OUT/ncu-$tag.csv" | head -3
  python3 scripts/ncu_steps.py "$OUT/ncu-$tag.csv" "$STEPS" | tee "$OUT/steps-$tag.txt"
done
rm -f "$OUT"/b-*.png
# The engine checks with every kernel a programmatic dependent and the GEMV on (KVQ_PDL_ALL=1 KVQ_GEMV=1).
KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 60 "$S/kvq-gpu" engine-check > "$OUT/engine.txt" 2>&1; echo "engine-check (PDL_ALL, GEMV) rc=$?"
grep -E "^FAIL|gemv|checks" "$OUT/engine.txt" | cut -c1-160
KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 60 "$S/kvq-gpu" resident-check > "$OUT/resident.txt" 2>&1; echo "resident-check (PDL_ALL, GEMV) rc=$?"
grep -E "FAIL|graphs|replayed" "$OUT/resident.txt" | cut -c1-200
