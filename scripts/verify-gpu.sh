#!/usr/bin/env bash
# A whole re-verification of the GPU side after kernel or engine changes, in two back-to-back calls
# (the model travels in two parts, see stage_model in device-common.sh). Built here first:
#   cargo build --release -p kvq --bin kvq-gpu
#   mkdir -p .carry-bin-gpu && strip -o /tmp/kvq-gpu target/release/kvq-gpu && xz -T2 -6 -c /tmp/kvq-gpu > .carry-bin-gpu/kvq-gpu.xz
#   (only kvq-gpu is needed; with a 47 MiB model part and the tree that is what fits in one carry)
#   call 1: carry [".carry-bin-gpu", ".carry-m1"], command "bash scripts/verify-gpu.sh kernels"
#     every kernel vs its CPU reference (kvq-gpu check), then compute-sanitizer memcheck and racecheck
#     on the hq=8 third of the decode cases and every encoder case, then B=1 4k attention timings of
#     fp16, DecoQuant-4 and QJL three times over;
#   (or "bash scripts/verify-gpu.sh quick": parity, memcheck on the encoder cases, racecheck on one QJL
#   configuration and the B=1 4k timings, for a small device budget)
#   call 2: carry [".carry-bin-gpu", ".carry-m2"], command "bash scripts/verify-gpu.sh engine"
#     engine-check and resident-check (tiny random models and the real model vs the CPU path), then
#     the attention micro-benchmark (32/8 heads, d=128) of fp16 and each compressed format at B=1 4k,
#     B=1 32k and B=8 128k, all in the same run so the ratios to fp16 compare.
# After a kernel change, "ab" (parity, then attention timings of this build against the previous one
# carried in .carry-bin-old/, interleaved in one run) and "sanitize" (memcheck and racecheck on the hq=8
# third, B=1 4k timings) split the kernels stage over two calls with room for the A/B timings.
# Each call leaves $OUT/<stage>.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
stage_model
stage=${1:?usage: verify-gpu.sh kernels|quick|ab|sanitize|profile|engine|ppl|prefill|rvq|ppl-rvq|formats|example}
R="$OUT/$stage"; mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
rc=0
# fp16 and one setting of each compressed format that has CUDA kernels: the formats every timing stage runs.
FORMATS="fp16 kivi:bits=4,window=0 kivi:bits=2,window=0 asymkv:lk=1,lv=0,window=0 decoquant:bits=4,chunk=256 qjl:m=256,m0=256,buffer=0"
# Kernel stages: full parity, compute-sanitizer `tool` on the cases matching `filter`, and B=1 4k
# timings of the formats nearest issue 5's 1.5x bound, three times over (run-to-run spread).
parity() {
  timeout 200 "$S/kvq-gpu" check > "$R/check.txt" 2>&1 || rc=1
  grep -E "^FAIL|^parity" "$R/check.txt" | head
}
sanitize() {  # tool filter timeout_s
  check_under "$1" "$2" "$3" "$R/$1.txt" || rc=1
}
b1_timings() {
  for i in 1 2 3; do
    KVQ_BENCH_POINTS=1x4096 timeout 60 "$S/kvq-gpu" bench fp16 decoquant:bits=4,chunk=256 qjl:m=256,m0=256,buffer=0 \
      >> "$R/attn-b1.jsonl" 2>> "$R/attn-b1.err"
  done
  cat "$R/attn-b1.jsonl"
}
# A/B attention timings of this build ($S/kvq-gpu) against an earlier one carried in .carry-bin-old/
# (kvq-gpu.xz of the commit before a kernel change), interleaved new/old/new/old in one run, with the
# device copy bandwidth of the same run (the "% of copy BW" denominator).
ab_timings() {
  # Every .carry-bin-old*/kvq-gpu.xz takes part, tagged by its folder's suffix (.carry-bin-old: "old",
  # .carry-bin-old-mid: "old-mid"), so one call can time a chain of changes.
  local bins=("$S/kvq-gpu") tags=(new) d
  for d in .carry-bin-old*; do
    [ -f "$d/kvq-gpu.xz" ] || continue
    mkdir -p "/root/stash-$d" && xz -dc "$d/kvq-gpu.xz" > "/root/stash-$d/kvq-gpu" && chmod +x "/root/stash-$d/kvq-gpu"
    bins+=("/root/stash-$d/kvq-gpu"); tags+=("${d#.carry-bin-}")
  done
  # AB_EXTRA: more formats (after parity, RVQ's synthetic books are at
  # ${TMPDIR:-/tmp}/kvq-check-rvq-256x8.safetensors); AB_FORMATS: this list instead of the usual one.
  local F="${AB_FORMATS:-$FORMATS kivi:bits=1,window=0 ${AB_EXTRA:-}}"
  for i in 1 2; do
    for k in "${!bins[@]}"; do
      KVQ_BENCH_POINTS=${AB_POINTS:-1x4096,8x131072} timeout 120 "${bins[$k]}" bench $F 2>> "$R/ab.err" | sed "s/^{/{\"build\":\"${tags[$k]}\",\"rep\":$i,/" >> "$R/ab.jsonl"
    done
  done
  python3 scripts/sdpa_bench.py --copy-only >> "$R/ab.jsonl" 2>> "$R/ab.err"
  cat "$R/ab.jsonl"
}
case "$stage" in
ab)
  # Parity of this build, then the A/B timings; the sanitizers are the next call (stage `sanitize`).
  parity; ab_timings ;;
sanitize)
  sanitize memcheck hq=8 200; sanitize racecheck hq=8 200; b1_timings ;;
ppl)
  # Perplexity through the GPU engine (resident cache, fused kernels) on the main sweep's setting
  # (alice29.txt, 16 windows of 1024), every main.plans row but RVQ's (stage ppl-rvq: they need the codebooks), to set
  # against the CPU sweep's values (docs/results/2026-11-24-quality/sweep-main.json). Needs the model
  # (both parts staged), the kvq CLI in .carry-bin/kvq.xz and data/corpus carried.
  [ -n "$MODEL" ] || { echo "ppl: model not staged"; exit 3; }
  # (the rows main.plans gained on 2026-12-06 are CPU-only options or need 16-stage codebooks: left out)
  P=$(sed '/^# Rows added/,$d' docs/sweeps/main.plans | grep -v '^#' | grep -v '^rvq' | sed '/^$/d' | sed 's/^/--kv /' | tr '\n' ' ')
  timeout 420 "$S/kvq" eval ppl --device cuda --model "$MODEL" --text data/corpus/alice29.txt --ctx 1024 \
    --max-windows 16 $P --json "$R/ppl-gpu.json" > "$R/ppl-gpu.txt" 2>&1 || rc=1
  tail -n 30 "$R/ppl-gpu.txt" ;;
prefill)
  # Issue 6: the Llama-3-8B shape (random f16 weights; the default model's tokenizer, carried as
  # .carry-peers/tokenizer.gguf and expanded here by random-llama-gguf.py with the gguf wheel) prefills
  # 32k real (random) tokens through the whole engine, then decodes, in every format with CUDA kernels.
  # One call, carry [".carry-bin", ".carry-peers"] (.carry-bin/kvq.xz: the kvq CLI).
  big=$S/llama3-8b-f16.gguf
  random_gguf llama3-8b "$big" > "$R/gguf.log" 2>&1; cat "$R/gguf.log"
  # RVQ with random codebooks (8 stages of 256 codes, the 8B shape's 32 layers) when kvq-gpu is carried
  # too (.carry-bin-gpu): a random-weight model's own calibration would mean nothing.
  RVQ=""
  if [ -x "$S/kvq-gpu" ] && "$S/kvq-gpu" rvq-books 32 256 8 /tmp/rvq-8b.safetensors; then
    RVQ="--kv rvq:codes=256,depth=8,window=0,codebooks=/tmp/rvq-8b.safetensors"
  fi
  timeout ${PREFILL_TIMEOUT:-380} "$S/kvq" bench decode --prefill --model "$big" --name "Llama-3-8B shape, random f16" \
    --ctx ${PREFILL_CTX:-32768} --batch 1 --steps 8 --warmup 2 --chunk 2048 $(for f in ${PREFILL_FORMATS:-$FORMATS}; do echo "--kv $f"; done) $RVQ \
    --json "$R/prefill.json" > "$R/prefill.txt" 2>&1 || rc=1
  grep -v "^\s*$" "$R/prefill.txt" | tail -n 16 ;;
profile)
  # Nsight Compute on one decode launch (the fourth) per format and point: speed of light, occupancy,
  # scheduler and warp-stall statistics, instruction mix, per-SASS-instruction stall samples. Leaves
  # p<i>.txt (details page) and p<i>-src.csv (the source page, SASS) per case. PROFILE_FORMATS,
  # PROFILE_POINTS choose the cases.
  [ -n "$NCU" ] || { echo "profile: no ncu"; exit 3; }
  i=0
  for pt in ${PROFILE_POINTS:-8x131072}; do
    for f in ${PROFILE_FORMATS:-$FORMATS}; do
      i=$((i + 1))
      KVQ_BENCH_POINTS=$pt timeout 150 "$NCU" --clock-control none -k regex:_decode_ --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy \
        --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        --section SourceCounters -f -o "$R/p$i" "$S/kvq-gpu" bench "$f" > "$R/p$i.log" 2>&1
      echo "p$i: $f at $pt rc=$?"
      "$NCU" --import "$R/p$i.ncu-rep" --page details > "$R/p$i.txt" 2>&1
      "$NCU" --import "$R/p$i.ncu-rep" --page source --csv --print-source sass > "$R/p$i-src.csv" 2>&1
      grep -E "Duration|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|DRAM Throughput|Memory Throughput" "$R/p$i.txt" | head -12
    done
  done ;;
kernels)
  parity; sanitize memcheck hq=8 170; sanitize racecheck hq=8 170; b1_timings ;;
rvq)
  # RVQ's kernels (kernels/formats/rvq.cu): full parity (kvq-gpu check writes the synthetic RVQ
  # codebooks to /tmp), memcheck on every RVQ case, racecheck on one RVQ setting, then attention
  # timings of RVQ (8 stages of 256 codes: 2.125 bits/elem at d=128) against fp16 and KIVI-2 in the
  # same run. One call, carry [".carry-bin-gpu"].
  parity; sanitize memcheck rvq 200; sanitize racecheck rvq:codes=16 200
  CB=${TMPDIR:-/tmp}/kvq-check-rvq-256x8.safetensors
  KVQ_BENCH_POINTS=1x4096,1x32768,8x131072 timeout 150 "$S/kvq-gpu" bench fp16 kivi:bits=2,window=0 \
    "rvq:codes=256,depth=8,window=0,codebooks=$CB" > "$R/attn.jsonl" 2> "$R/attn.err"
  echo "attention bench rc=$?"; cat "$R/attn.jsonl" ;;
ppl-rvq)
  # The main sweep's RVQ rows through the GPU engine (resident cache, RVQ's CUDA encoder and decode
  # kernel), to set against the CPU sweep. Needs the model (both parts staged), .carry-bin/kvq.xz,
  # data/corpus and the codebooks data/rvq-lcet10-256x8.safetensors carried.
  [ -n "$MODEL" ] || { echo "ppl-rvq: model not staged"; exit 3; }
  P=$(sed '/^# Rows added/,$d' docs/sweeps/main.plans | grep '^rvq' | sed 's/^/--kv /' | tr '\n' ' ')
  timeout 420 "$S/kvq" eval ppl --device cuda --model "$MODEL" --text data/corpus/alice29.txt --ctx 1024 \
    --max-windows 16 --kv fp16 $P --json "$R/ppl-gpu.json" > "$R/ppl-gpu.txt" 2>&1 || rc=1
  tail -n 30 "$R/ppl-gpu.txt" ;;
formats)
  # Issue 6, every format on the real model through the GPU engine: greedy `kvq generate --device cuda`
  # (32 tokens after a ~500-token passage of alice29.txt, so every format seals blocks; compare with the
  # same command on the CPU, scripts/formats-cpu.sh) and `eval ppl --device cuda` of the AsymKV plans
  # that do not wreck the model (4-bit keys; values 4-bit in the first 15 layers, 2-bit after; or 2-bit
  # values with a 128-token window), against their CPU values. Needs the model (both parts staged),
  # .carry-bin/kvq.xz, data/corpus/alice29.txt and the codebooks
  # data/rvq-lcet10-256x8.safetensors.
  [ -n "$MODEL" ] || { echo "formats: model not staged"; exit 3; }
  . scripts/formats-plans.sh
  for kv in "${GEN_PLANS[@]}"; do
    echo "== $kv" >> "$R/generate-gpu.txt"
    timeout 60 "$S/kvq" generate --device cuda --model "$MODEL" --kv "$kv" --max-tokens 32 "$PROMPT" \
      >> "$R/generate-gpu.txt" 2>> "$R/generate-gpu.err" || { echo "generate $kv failed"; rc=1; }
    echo >> "$R/generate-gpu.txt"
  done
  cat "$R/generate-gpu.txt" | cut -c1-200
  # The embedding example (examples/generate.rs, built here by `cargo build --release --example generate`
  # and carried as .carry-ex/generate.xz, in any call of the same warm machine: the stash keeps it):
  # the library API end to end, fp16 and one compressed plan.
  if [ -x "$S/generate" ]; then
    for kv in fp16 kivi:bits=4,window=0; do
      timeout 60 "$S/generate" "$MODEL" "$PROMPT" "$kv" 32 > "$R/example-$kv.txt" 2>&1; echo "example $kv rc=$?"
      tail -n 3 "$R/example-$kv.txt" | cut -c1-200
    done
  fi
  timeout 300 "$S/kvq" eval ppl --device cuda --model "$MODEL" --text data/corpus/alice29.txt --ctx 1024 \
    --max-windows 16 --kv fp16 $(for p in "${PPL_PLANS[@]}"; do echo "--kv $p"; done) --json "$R/ppl-gpu.json" \
    > "$R/ppl-gpu.txt" 2>&1 || rc=1
  tail -n 8 "$R/ppl-gpu.txt" ;;
example)
  # The embedding example alone (examples/generate.rs through the library API, carried as
  # .carry-ex/generate.xz) on every GEN_PLANS plan whose files are here (RVQ needs its codebooks), with
  # the model staged and data/corpus carried.
  [ -n "$MODEL" ] || { echo "example: model not staged"; exit 3; }
  [ -x "$S/generate" ] || { echo "example: no generate binary in the stash (.carry-ex)"; exit 3; }
  . scripts/formats-plans.sh
  for kv in "${GEN_PLANS[@]}"; do
    case "$kv" in *codebooks=*) [ -f "${kv##*codebooks=}" ] || { echo "skip $kv (no codebooks)"; continue; } ;; esac
    echo "== $kv" >> "$R/example.txt"
    timeout 60 "$S/generate" "$MODEL" "$PROMPT" "$kv" 32 >> "$R/example.txt" 2>> "$R/example.err"
    r=$?; echo "example $kv rc=$r" | tee -a "$R/example.txt"; [ $r = 0 ] || rc=1
    tail -c 240 "$R/example.txt" | head -n -1
  done
  tail -n 20 "$R/example.err" | cut -c1-200 ;;
quick)
  # A short form of `kernels` for a small device budget: memcheck on the encoder cases (where the host
  # probes each module's symbols), racecheck on one QJL configuration.
  parity; sanitize memcheck encode 120; sanitize racecheck qjl:buffer=0 120; b1_timings ;;
engine)
  timeout 200 "$S/kvq-gpu" engine-check > "$R/engine.txt" 2>&1 || rc=1
  grep -E "^(FAIL|SKIPPED|decode:|engine-check:)" "$R/engine.txt" | cut -c1-170
  timeout 150 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1 || rc=1
  grep -E "^FAIL|SKIPPED|resident-check:" "$R/resident.txt" | cut -c1-170
  KVQ_BENCH_POINTS=1x4096,1x32768,8x131072 timeout 150 "$S/kvq-gpu" bench $FORMATS > "$R/attn.jsonl" 2> "$R/attn.err"
  echo "attention bench rc=$?"; cat "$R/attn.jsonl" ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
tar czf "$OUT/$stage.tar.gz" -C "$OUT" "$stage" && rm -rf "$R"
exit $rc
