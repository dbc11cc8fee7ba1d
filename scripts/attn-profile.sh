#!/usr/bin/env bash
# Why a batch-1 decode-attention launch at 4k takes ~20 us when its bytes need ~6 us (issue 5/11):
# Nsight Compute sections (speed of light, occupancy, launch, scheduler, warp states, memory) of one
# decode launch per format at B=1, 4k, 32/8 heads, d=128 (the attention micro-benchmark), of one at
# the 135M shape inside a decode step, and of the decode-step GEMV on a 4096x4096 weight.
# One call, carry [".carry-bin"]; text reports in $OUT/attn-profile.tar.gz, a digest printed.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R="$OUT/p"; mkdir -p "$R"
SEC="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis"
digest() { grep -E "^  [a-z_]+.*\(|Duration|Achieved Occupancy|Theoretical Occupancy|Grid Size|Registers Per|Block Size|Waves Per SM|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible|Active Warps Per Scheduler|Eligible Warps|Dynamic Shared" "$1" | head -40; grep -iE "stall|on average, each warp" "$1" | head -8; }
for f in fp16 kivi:bits=2,window=0; do
  tag=$(echo "$f" | tr ":=," "___")
  KVQ_BENCH_POINTS=1x4096 timeout 120 "$NCU" --clock-control none $SEC -k regex:decode --launch-skip 20 --launch-count 1 \
    "$S/kvq-gpu" bench "$f" > "$R/attn-$tag.txt" 2>&1
  echo "== decode $f B=1 4k rc=$?"; digest "$R/attn-$tag.txt"
done
"$S/kvq-gpu" random-model /tmp/rm135 > /dev/null
timeout 120 "$NCU" --clock-control none $SEC -k regex:decode --launch-skip 200 --launch-count 1 \
  "$S/kvq" bench decode --model /tmp/rm135 --ctx 4096 --batch 1 --steps 4 --warmup 2 --kv fp16 --json /tmp/x.json > "$R/attn-135m.txt" 2>&1
echo "== decode fp16 135M shape B=1 4k rc=$?"; digest "$R/attn-135m.txt"
timeout 120 "$NCU" --clock-control none $SEC -k regex:gemv1 --launch-skip 40 --launch-count 1 \
  "$S/kvq-gpu" gemm-bench > "$R/gemv.txt" 2>&1
echo "== gemv1 rc=$?"; digest "$R/gemv.txt"
tar czf "$OUT/attn-profile.tar.gz" -C "$OUT" p && rm -rf "$R"
