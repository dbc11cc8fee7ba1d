#!/usr/bin/env bash
# Runs ON the GPU machine (no Rust there) over binaries built here and carried in .carry/:
#   cargo build --release -p kvq --bin kvq-gpu && mkdir -p .carry && cp target/release/kvq-gpu .carry/
#   device run: carry [".carry"], command "bash scripts/gpu-check.sh"
# Parity of every kernel vs the CPU reference, compute-sanitizer memcheck/racecheck on the parity run,
# then decode-attention timings of kvq and PyTorch SDPA in the same run. Logs land in $OUT.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/kvq-out}; mkdir -p "$OUT"
bin=.carry/kvq-gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== parity"; timeout 150 $bin check 2>&1 | tee "$OUT/parity.txt" | tail -n 3; parity_rc=${PIPESTATUS[0]}
if [ "${SANITIZE:-1}" = 1 ]; then
  # Sanitizers run a third of the decode cases (hq=8: every format, head_dim, length and batch) and every
  # encoder case: the full matrix under racecheck takes longer than one device call allows.
  export KVQ_CHECK_FILTER=${SAN_FILTER:-hq=8}
  echo "== compute-sanitizer memcheck"; timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 $bin check >"$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -n 2 "$OUT/memcheck.txt"
  echo "== compute-sanitizer racecheck"; timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 $bin check >"$OUT/racecheck.txt" 2>&1; echo "racecheck rc=$?"; tail -n 2 "$OUT/racecheck.txt"
  unset KVQ_CHECK_FILTER
fi
echo "== bench"; timeout 200 $bin bench ${BENCH_FORMATS:-} >"$OUT/kvq-bench.jsonl" 2>"$OUT/kvq-bench.err"; echo "kvq bench rc=$?"
PYTHONUNBUFFERED=1 python3 scripts/sdpa_bench.py >"$OUT/sdpa-bench.jsonl" 2>"$OUT/sdpa.err"; echo "sdpa rc=$?"
python3 scripts/report.py "$OUT/kvq-bench.jsonl" "$OUT/sdpa-bench.jsonl" | tee "$OUT/table.md"
exit $parity_rc
