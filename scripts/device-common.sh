# Sourced by the device scripts (bench-gpu.sh, verify-gpu.sh, profile-step.sh, step-8b.sh, ...): CUDA's libraries on the path, $OUT, the machine's stash $S with the carried
# binaries (.carry-bin/*.xz) unpacked there once, $NCU (Nsight Compute), and the helpers below (model parts, random GGUFs, llama.cpp).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/kvq-out}; mkdir -p "$OUT"
S=/root/stash; mkdir -p "$S"
export KVQ_REPO=$PWD  # the repository root (scripts run from it), for helpers started in the background
for c in .carry-bin .carry-bin-gpu .carry-ex; do [ -d $c ] && cp -r $c/. "$S"/; done
# (unpacked again when a call carries a newer .xz: the machine may still hold an older binary)
for b in kvq kvq-gpu generate; do [ -f "$S/$b.xz" ] && { [ ! -x "$S/$b" ] || [ "$S/$b.xz" -nt "$S/$b" ]; } && xz -dc "$S/$b.xz" > "$S/$b" && chmod +x "$S/$b"; done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)

# stage_model: the real model (98 MB) is over the 64 MiB carry limit, so it travels in two parts
# (.carry-m1/model.part.00, .carry-m2/model.part.01, made here by
#   split -n 2 -d models/SmolLM2-135M-Instruct.Q4_1.gguf model.part.; mv model.part.00 .carry-m1/; mv model.part.01 .carry-m2/)
# over two calls; parts wait in models/cache/ (ignored, kept while the machine stays warm) and the
# model is assembled, sha256-checked, once both are there. Sets $MODEL when it is.
stage_model() {
  local model=models/SmolLM2-135M-Instruct.Q4_1.gguf
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  mkdir -p models/cache
  for p in .carry-m*/model.part.*; do [ -f "$p" ] && cp "$p" models/cache/ && echo "staged $p"; done
  if [ ! -f "$model" ] && [ -f models/cache/model.part.00 ] && [ -f models/cache/model.part.01 ]; then
    cat models/cache/model.part.00 models/cache/model.part.01 > "$model.tmp"
    if [ "$(sha256sum "$model.tmp" | cut -d' ' -f1)" = "$sha" ]; then mv "$model.tmp" "$model"; echo "assembled $model (sha256 ok)"
    else echo "assembled model has the wrong sha256; ignoring it"; rm -f "$model.tmp"; fi
  fi
  MODEL=""; [ -f "$model" ] && MODEL=$model
}

# random_gguf SHAPE OUT [SRC]: a random-weight f16 GGUF of SHAPE (llama3-8b, llama3.2-1b, ...) carrying
# the tokenizer of SRC (default: the carried tokenizer-only GGUF), written by random-llama-gguf.py with
# the gguf wheel (from .carry-peers, .carry-peers-small or the stash), unless OUT exists. Its last line
# is the script's "wrote ...", which bench-gpu.sh waits for.
random_gguf() {
  local shape=$1 out=$2 src=${3:-} d
  [ -f "$out" ] && return 0
  for d in .carry-peers .carry-peers-small "$S"; do [ -f "$d/random-llama-gguf.py" ] && break; done
  src=${src:-$d/tokenizer.gguf}
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$d"/gguf-*.whl || return 1
  local t0; t0=$(date +%s)
  # RANDOM_GGUF_REUSE=1: each weight shape drawn once and reused by every layer (scripts/random_gguf_reuse.py:
  # about 1/32 of the draws, same layout and shapes; for diagnosis calls)
  local reuse=(); [ "${RANDOM_GGUF_REUSE:-0}" = 1 ] && reuse=("$KVQ_REPO/scripts/random_gguf_reuse.py")
  PYTHONPATH=/tmp/site timeout 300 python3 "${reuse[@]}" "$d/random-llama-gguf.py" "$src" "$out" "$shape" f16 | tail -n 1
  echo "$shape GGUF rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
}


# The llama.cpp CUDA build (../shared/peers/build-llamacpp-cuda.sh, carried into $S with its source) and
# its binaries' folder.
LB=${LB:-$S/llama/build/bin}
# start_build [NICE]: that build in the background (detached: it outlives the call), unless built or started.
start_build() {
  [ -x "$LB/llama-batched-bench" ] && return 0
  # (once per machine: a script that started it earlier leaves the marker, so a later one waits instead)
  [ -f "$S/llama-build.started" ] && { echo "llama.cpp build already under way"; return 0; }
  touch "$S/llama-build.started"
  setsid nohup nice -n "${1:-0}" bash "$S/build-llamacpp-cuda.sh" "$S/llama-src.tar.gz" "$S/llama" > "$S/llama-build.log" 2>&1 < /dev/null &
  echo "llama.cpp build started in the background"
}
# wait_build [SECONDS]: until llama-batched-bench exists (at most SECONDS, default 400).
wait_build() {
  local i
  echo "== waiting for the llama.cpp build"; for i in $(seq 1 $(( ${1:-400} / 5 ))); do [ -x "$LB/llama-batched-bench" ] && break; sleep 5; done
}
# gguf_in_background SHAPE OUT [SRC]: random_gguf detached (one core; it outlives the call), its log in
# $S/gguf.log, whose last line is "wrote ..." once done (wait_gguf).
gguf_in_background() {
  export -f random_gguf; export S
  setsid nohup bash -c 'random_gguf "$0" "$1" "$2"' "$1" "$2" "${3:-}" > "$S/gguf.log" 2>&1 < /dev/null &
}
# wait_gguf [SECONDS]: until the background GGUF is written (at most SECONDS, default 300); prints its log.
wait_gguf() {
  local i
  echo "== waiting for the GGUF"; for i in $(seq 1 $(( ${1:-300} / 3 ))); do grep -q wrote "$S/gguf.log" 2>/dev/null && break; sleep 3; done
  cat "$S/gguf.log"
}
# llama_bench MODEL CTK CTXS OUT BATCHES...: llama-batched-bench at each batch size (one process per
# batch so -c fits), 64 generated tokens after each prompt length of CTXS (comma-separated), JSONL
# appended to OUT (stderr to OUT.err).
llama_bench() {
  local m=$1 t=$2 ctxs=$3 out=$4 b; shift 4
  for b in "$@"; do
    local maxp; maxp=$(echo "$ctxs" | tr ',' '\n' | sort -n | tail -1)
    local c=$(( (maxp + 64) * b + 256 ))
    echo "== llama-batched-bench $t B=$b ctx $ctxs (-c $c)"
    timeout 400 "$LB/llama-batched-bench" -m "$m" -ngl 99 -fa on -ctk "$t" -ctv "$t" -c "$c" -b 2048 -ub 512 \
      -npp "$ctxs" -ntg 64 -npl "$b" --output-format jsonl 2>>"$out.err" | grep '^{' | tee -a "$out"
  done
}

# check_under TOOL FILTER TIMEOUT OUTFILE: `kvq-gpu check` on the parity cases whose name contains FILTER
# under compute-sanitizer TOOL (memcheck, racecheck), its log in OUTFILE; prints the rc and the
# summary, returns the rc.
check_under() {
  KVQ_CHECK_FILTER=$2 timeout "$3" compute-sanitizer --tool "$1" --error-exitcode 9 "$S/kvq-gpu" check > "$4" 2>&1
  local r=$?; echo "$1 ($2) rc=$r"; tail -n 2 "$4"; return $r
}
# split_sweep REPS "SPLITS" OUT FORMATS...: B=1 4k attention timings (`kvq-gpu bench`) of FORMATS with
# each decode split length of SPLITS (KVQ_SPLIT_TOKENS; "default" = the built-in rule), REPS times
# round, JSON lines tagged with split and rep appended to OUT (stderr to OUT.err).
split_sweep() {
  local reps=$1 splits=$2 out=$3 i st; shift 3
  for i in $(seq 1 "$reps"); do
    for st in $splits; do
      ( [ "$st" = default ] || export KVQ_SPLIT_TOKENS=$st
        KVQ_BENCH_POINTS=1x4096 timeout 60 "$S/kvq-gpu" bench "$@" 2>>"$out.err" \
          | sed "s/^{/{\"split\":\"$st\",\"rep\":$i,/" >> "$out" )
    done
  done
}
