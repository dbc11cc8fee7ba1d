#!/usr/bin/env bash
# Where QJL's batch-1, 4k decode launch spends the time fp16's does not (issue 5's 1.5x bound): Nsight
# Compute on one launch each of fp16 and QJL (m=256) at B=1, 4k, 32/8 heads, d=128, with the warp-state
# and source-counter (SASS hot spots, stall reasons) sections. One call, carry [".carry-bin-gpu"].
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R="$OUT/qjl-profile"; mkdir -p "$R"
SEC="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats --section SourceCounters --section InstructionStats"
for f in fp16 qjl:m=256,m0=256,buffer=0; do
  tag=$(echo "$f" | tr ":=," "___")
  KVQ_BENCH_POINTS=1x4096 timeout 150 "$NCU" --clock-control none $SEC -k regex:decode --launch-skip 20 --launch-count 1 \
    "$S/kvq-gpu" bench "$f" > "$R/$tag.txt" 2>&1
  echo "== $f rc=$?"
  grep -E "Duration|Executed Instructions |Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible|Registers Per|Grid Size|Dynamic Shared|Achieved Occupancy" "$R/$tag.txt" | head -14
  grep -iE "stall|on average" "$R/$tag.txt" | head -6 | cut -c1-400
done
tar czf "$OUT/qjl-profile.tar.gz" -C "$OUT" qjl-profile
