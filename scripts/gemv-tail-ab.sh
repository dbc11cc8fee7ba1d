#!/usr/bin/env bash
# Run 15's second change set against the binaries before it, in one call on a fresh machine:
# the GEMV's last partial batch of rows as one batch of loads and the next chunk's first rows requested
# before its x is staged (kernels/model.cu), and every kernel a programmatic dependent by default
# (src/gpu.rs). Parity first (kvq-gpu check on the hq=8 third, engine-check, resident-check: PDL is now
# on in all of them), then `gemm-bench` (the 8B shape's GEMMs and whole GEMM chains) prev vs new, then
# whole decode steps on a random Llama-3.2-1B-shape f16 GGUF (written here, ~25 s): prev, new, new with
# KVQ_PDL_ALL=0. Carry [".carry-bin", ".carry-bin-prev", ".carry-peers-small"] (.carry-bin-prev holds
# kvq-prev.xz / kvq-gpu-prev.xz, the builds of the commit before). Results: $OUT/ab15.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R=$OUT/ab15; mkdir -p "$R"
for b in kvq-prev kvq-gpu-prev; do xz -dc ".carry-bin-prev/$b.xz" > "$S/$b" && chmod +x "$S/$b"; done
cp .carry-peers-small/* "$S"/
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$S"/gguf-*.whl
l1b=$S/l1b.gguf
PYTHONPATH=/tmp/site setsid nohup nice -n 10 python3 "$S/random-llama-gguf.py" "$S/tokenizer.gguf" "$l1b" llama3.2-1b f16 > "$S/l1b.log" 2>&1 < /dev/null &
save() { tar czf "$OUT/ab15.tar.gz" -C "$OUT" ab15; }
KVQ_CHECK_FILTER=${FILTER:-hq=8} timeout 120 "$S/kvq-gpu" check > "$R/check.txt" 2>&1; echo "check rc=$?"
grep -E "^parity" "$R/check.txt" | tail -1; grep "^FAIL" "$R/check.txt" | head -5
timeout 90 "$S/kvq-gpu" engine-check > "$R/engine.txt" 2>&1; echo "engine-check rc=$?"
grep -E "^FAIL|checks" "$R/engine.txt" | cut -c1-200 | head
timeout 90 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check rc=$?"
grep -E "^FAIL" "$R/resident.txt" | cut -c1-120 | head; grep -c "^PASS" "$R/resident.txt"; save
for v in prev new; do
  b=$S/kvq-gpu; [ $v = prev ] && b=$S/kvq-gpu-prev
  timeout 60 "$b" gemm-bench > "$R/gemm-$v.txt" 2>&1; echo "== gemm-bench $v rc=$?"; grep -E "^\| 1 |chain" "$R/gemm-$v.txt"
done; save
echo "== waiting for the 1B GGUF"; for i in $(seq 1 40); do grep -q wrote "$S/l1b.log" 2>/dev/null && break; sleep 3; done; cat "$S/l1b.log"
for v in prev new pdl0; do
  b=$S/kvq; [ $v = prev ] && b=$S/kvq-prev
  env $( [ $v = pdl0 ] && echo KVQ_PDL_ALL=0 ) timeout 90 "$b" bench decode --model "$l1b" --ctx 4096,32768 --batch 1,8 --steps 32 \
    --kv fp16 --kv kivi:bits=2,window=0 --json "$R/step-$v.json" > "$R/step-$v.log" 2>&1
  echo "== step $v rc=$?"; grep "T=" "$R/step-$v.log" | sed 's/ (.*nodes)//' | cut -c1-100
done
rm -f "$R"/*.png; save
