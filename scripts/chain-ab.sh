#!/usr/bin/env bash
# Chained greedy decode (Engine::decode_greedy: each step's picks fed to the next on the device, so the
# host issues step t+1 while the GPU runs step t; `bench decode --chained`) against one synchronous
# step at a time (the default), in one call on a fresh machine: parity first (kvq-gpu check on the
# hq=8 third with every kernel a programmatic dependent, resident-check, which compares chained and
# step-by-step greedy tokens), then `bench decode` on the random Llama-3-8B-shape f16 GGUF (written
# here, about 150 s) both ways, fp16 and KIVI-2, B=1/8 at 4k/32k; with .carry-peers also llama.cpp f16
# at the same points (built here in the background meanwhile, about 5 minutes), so that the ratios to
# it come from the same call. Carry [".carry-bin", ".carry-peers"] (or ".carry-peers-small" without
# llama.cpp). Results: $OUT/chain.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R=$OUT/chain; mkdir -p "$R"
big=$S/llama3-8b-f16.gguf
gguf_in_background llama3-8b "$big"
if [ -f .carry-peers/llama-src.tar.gz ]; then
  cp -r .carry-peers/. "$S"/
  start_build 15
fi
save() { rm -f "$R"/*.png; tar czf "$OUT/chain.tar.gz" -C "$OUT" chain; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
KVQ_CHECK_FILTER=${FILTER:-hq=8} timeout 150 "$S/kvq-gpu" check > "$R/check.txt" 2>&1; echo "check rc=$?"
grep -E "^parity" "$R/check.txt" | tail -1; grep "^FAIL" "$R/check.txt" | head -5
timeout 90 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check rc=$?"
grep -E "^FAIL" "$R/resident.txt" | cut -c1-160 | head; grep -c "^PASS" "$R/resident.txt"; grep "chained" "$R/resident.txt" | cut -c1-200; save
wait_gguf 180
for v in chained sync; do
  a=(); [ $v = chained ] && a=(--chained)
  timeout 150 "$S/kvq" bench decode --model "$big" --name "Llama-3-8B shape, random f16 ($v steps)" --ctx 4096,32768 --batch 1,8 \
    --steps 32 --kv fp16 --kv kivi:bits=2,window=0 --json "$R/bench-$v.json" "${a[@]}" > "$R/bench-$v.log" 2>&1
  echo "== $v rc=$?"; grep "T=" "$R/bench-$v.log" | sed 's/ graph nodes//; s/  */ /g' | cut -c1-200; save
done
# llama.cpp f16 at the same points, once its build is done (-c sized for each batch).
[ -f .carry-peers/llama-src.tar.gz ] || exit 0
wait_build 300; tail -n 2 "$S/llama-build.log"
[ -x "$LB/llama-batched-bench" ] && llama_bench "$big" f16 4096,32768 "$R/llama-f16.jsonl" 1 8 | cut -c1-300
save
