#!/usr/bin/env bash
# Issue 11 on the GPU machine: llama.cpp (built there from the carried source) and `kvq bench decode`
# over the same GGUF files in the same run, one JSON + PNGs per model. No Rust there: the kvq binary is
# built here and carried xz-compressed; the default model (98 MB) travels in two parts.
#
# Here, once:
#   cargo build --release -p kvq-cli && mkdir -p .carry-bin && xz -T2 -c target/release/kvq > .carry-bin/kvq.xz
#   mkdir -p .carry-m1 .carry-m2 && split -n 2 -d models/SmolLM2-135M-Instruct.Q4_1.gguf model.part.
#   mv model.part.00 .carry-m1/ && mv model.part.01 .carry-m2/
#   mkdir -p .carry-peers && ../shared/peers/fetch-llamacpp.sh /tmp/llama && cp /tmp/llama/llama-src.tar.gz \
#     ../shared/peers/build-llamacpp-cuda.sh ../shared/peers/random-llama-gguf.py .carry-peers/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .carry-peers gguf==0.19.0
# Then four back-to-back device calls (the machine keeps /root/stash while it stays warm):
#   1. carry [".carry-m1", ".carry-peers"]   command "bash scripts/bench-gpu.sh stage"
#      (stashes, starts the llama.cpp CUDA build in the background: about 4 minutes; with
#      .carry-peers/tokenizer.gguf also the 8B-shape GGUF, so `big` can follow without the model parts)
#   2. carry [".carry-m2", ".carry-bin"]     command "bash scripts/bench-gpu.sh check"
#      (parity of kernels/encoders and the engine vs the CPU path with these binaries; optional)
#   2b. carry []                             command "bash scripts/bench-gpu.sh llama-small"
#      (waits for the build, llama.cpp on the default model; writes the 8B-shape f16 GGUF in the background)
#   3. carry []                              command "bash scripts/bench-gpu.sh kvq-small"
#      (kvq on the default model, llama.cpp's figures merged)
#   4. carry []                              command "bash scripts/bench-gpu.sh big"
#      (llama.cpp and kvq on the random Llama-3-8B-shape f16 GGUF)
#   4b. carry []   EXTRA_PLANS_BIG="..." bash scripts/bench-gpu.sh big-extra   (more kvq plans, same peers)
# The 8B shape in ONE call (preferred: a machine can be taken back between calls; run 15 took 316 s):
#   carry [".carry-peers", ".carry-bin"]  "export LLAMA_TYPES='f16 q4_0' EXTRA_PLANS_BIG='...'; bash scripts/bench-gpu.sh big-all"
# The 8B shape alone, in two calls (.carry-peers/tokenizer.gguf made here once by
# `random-llama-gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf .carry-peers/tokenizer.gguf tokenizer`):
#   1. carry [".carry-peers", ".carry-bin"]  "bash scripts/bench-gpu.sh stage; bash scripts/verify-gpu.sh sanitize"
#      (the build and the GGUF writer use the CPUs while the sanitizers use the GPU)
#   2. carry [".carry-m1"]  "export LLAMA_TYPES='f16 q4_0'; bash scripts/bench-gpu.sh big"  (m1 waits for
#      the 135M calls: 3. carry [".carry-m2"] llama-small, then kvq-small)
# KVQ_BENCH_EXTRA adds arguments to every `kvq bench decode` here, e.g. "--chained" (greedy steps chained on
# the device, Engine::decode_greedy, as a generation loop runs them; default: one synchronous step at a
# time).
# Results: $OUT/bench-<model>.tar.gz (JSON, PNGs, logs), summaries in the output.
set -uo pipefail
# CUDA's libraries, $OUT, the stash $S with the carried binaries unpacked, random_gguf.
. "$(dirname "$0")/device-common.sh"
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
small="$S/SmolLM2-135M-Instruct.Q4_1.gguf"
big="$S/llama3-8b-f16.gguf"
KVQ_PLANS_SMALL=${KVQ_PLANS_SMALL:-"kivi:bits=4 kivi:bits=4,window=0 kivi:bits=2 kivi:bits=2,window=0 asymkv:lk=30,lv=0,window=0 asymkv:lk=0,lv=0,window=0"}
KVQ_PLANS_BIG=${KVQ_PLANS_BIG:-"kivi:bits=4,window=0 kivi:bits=2 kivi:bits=2,window=0 asymkv:lk=32,lv=0,window=0 asymkv:lk=0,lv=0,window=0"}
# Points (override for a shorter run): contexts (comma-separated) and batch sizes (space-separated).
SMALL_CTX=${SMALL_CTX:-4096,16384,32768,65536,131072}; SMALL_BATCH=${SMALL_BATCH:-"1 8"}; SMALL_B32=${SMALL_B32:-1}
BIG_CTX=${BIG_CTX:-4096,32768}; BIG_BATCH=${BIG_BATCH:-"1 8"}  # BIG_STEPS: timed steps per point (16)
# The same fp16 points again with every kernel issued on its own (--no-graphs): what the graphs buy.
# WRITE_BIG=0 keeps llama-small from writing the 8B GGUF in the background (when no big run follows).
NO_GRAPHS_TOO=${NO_GRAPHS_TOO:-0}
# The fp16 points of the 8B shape again through cuBLAS (KVQ_GEMV=0): what the decode-step GEMV buys.
GEMV_TOO=${GEMV_TOO:-1}
# llama.cpp KV types to run (a shorter run may drop q8_0); ENGINE_CHECK=0 skips engine-check in `check`.
LLAMA_TYPES=${LLAMA_TYPES:-"f16 q8_0 q4_0"}

# The 8B-shape f16 GGUF from the tokenizer of $1 (the default model or the tokenizer-only GGUF), written
# by random_gguf in the background (one core, detached: it outlives the call) unless it exists or
# WRITE_BIG=0; `big` waits for its "wrote" line in $S/gguf.log.
write_big() {
  [ -f "$big" ] || [ "${WRITE_BIG:-1}" = 0 ] && return 0
  gguf_in_background llama3-8b "$big" "$1"
  echo "8B GGUF being written in the background"
}

stage_parts() {
  [ -f "$S/env" ] && . "$S/env"
  for d in .carry-m1 .carry-m2 .carry-peers; do [ -d "$d" ] && cp -r "$d"/. "$S"/; done
  if [ ! -f "$small" ] && [ -f "$S/model.part.00" ] && [ -f "$S/model.part.01" ]; then
    cat "$S/model.part.00" "$S/model.part.01" > "$small.tmp"
    if [ "$(sha256sum "$small.tmp" | cut -d' ' -f1)" = "$model_sha" ]; then mv "$small.tmp" "$small"; echo "assembled $small (sha256 ok)"
    else echo "assembled model has the wrong sha256"; rm -f "$small.tmp"; fi
  fi
}

# The 8B-shape steps that `big`, `big-all` and `big-extra` share; results in $R, tarball in $OUT.
big_batches() { echo $BIG_BATCH | tr ' ' ','; }
llama_big() {
  for t in $LLAMA_TYPES; do llama_bench "$big" "$t" "$BIG_CTX" "$R/llama-$t.jsonl" $BIG_BATCH >/dev/null; done
  grep -h '^{' "$R"/llama-*.jsonl
}
big_peers() { peers=(); for t in $LLAMA_TYPES; do peers+=(--peer "llama.cpp $t=$R/llama-$t.jsonl"); done; }
# KVQ_PLANS_BIG (with the --peer arguments given, if any), then the tarball.
big_main() {
  local kv=(); for p in $KVQ_PLANS_BIG; do kv+=(--kv "$p"); done
  timeout 300 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model "$big" --name "Llama-3-8B shape, random f16" --ctx "$BIG_CTX" \
    --batch "$(big_batches)" --steps "${BIG_STEPS:-16}" --json "$R/bench.json" "${kv[@]}" "$@" 2>&1 | tee "$R/kvq.log"
  tar czf "$OUT/bench-big.tar.gz" -C "$R" .
}
big_extra() { # timeout
  local kx=(); for p in $EXTRA_PLANS_BIG; do kx+=(--kv "$p"); done
  timeout "$1" "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model "$big" --name "Llama-3-8B shape, random f16 (more formats)" \
    --ctx "$BIG_CTX" --batch "$(big_batches)" --steps 16 --json "$R/bench-extra.json" "${kx[@]}" "${peers[@]}" \
    2>&1 | tee "$R/kvq-extra.log"
  tar czf "$OUT/bench-big.tar.gz" -C "$R" .
}
big_cublas() { # timeout: the fp16 points through cuBLAS (KVQ_GEMV=0), when GEMV_TOO=1
  [ "$GEMV_TOO" = 1 ] || return 0
  KVQ_GEMV=0 timeout "$1" "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model "$big" --name "Llama-3-8B shape, cuBLAS GEMMs (KVQ_GEMV=0)" --ctx "$BIG_CTX" \
    --batch "$(big_batches)" --steps 16 --json "$R/bench-cublas.json" --kv fp16 "${peers[@]}" 2>&1 | tee "$R/kvq-cublas.log" | grep "T="
  tar czf "$OUT/bench-big.tar.gz" -C "$R" .
}

case "${1:-}" in
stage)
  stage_parts
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  start_build
  # From the tokenizer-only GGUF (.carry-peers/tokenizer.gguf) while the build runs, so `big` needs
  # no model part.
  if [ -f "$S/tokenizer.gguf" ]; then write_big "$S/tokenizer.gguf"; fi
  ;;
check)
  # Kernel + encoder parity and the engine on the real model (greedy tokens vs the CPU path) with the
  # binaries of this run, before anything is timed: kvq-gpu travels beside kvq (.carry-bin/kvq-gpu.xz).
  stage_parts
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 300 "$S/kvq-gpu" check > "$S/check.txt" 2>&1; echo "check rc=$?"
  grep -E "^(FAIL|parity|encode|check|SUMMARY|all)" "$S/check.txt" | tail -n 8; tail -n 3 "$S/check.txt"
  # Decode kernels merge their splits in the last CTA: if a decode case fails that way, check the
  # separate merge kernel, and if it passes, every later call of this machine uses it ($S/env).
  if grep -v "encode" "$S/check.txt" | grep -q "^FAIL"; then
    KVQ_SPLIT_MERGE=1 timeout 300 "$S/kvq-gpu" check > "$S/check-split.txt" 2>&1
    echo "check with KVQ_SPLIT_MERGE=1: rc=$?"; grep -E "^parity" "$S/check-split.txt"
    grep -v "encode" "$S/check-split.txt" | grep -q "^FAIL" || { echo "export KVQ_SPLIT_MERGE=1" >> "$S/env"; echo "using the split merge"; }
  fi
  [ -f "$S/env" ] && . "$S/env"
  # Model ops and GEMMs vs CPU, the engine vs the CPU path on tiny models and the real model.
  [ "${ENGINE_CHECK:-1}" = 1 ] && { timeout 240 "$S/kvq-gpu" engine-check --model "$small" > "$S/engine.txt" 2>&1; echo "engine-check rc=$?"; }
  grep -E "FAIL|gemm|checks" "$S/engine.txt" | head -n 30
  # The op checks run the decode-step GEMV (the default) too: if it fails, every later call of this
  # machine takes cuBLAS (KVQ_GEMV=0 in $S/env) and GEMV_TOO is skipped.
  grep -E "^FAIL.*(via gemv|folded)" "$S/engine.txt" && { printf "export KVQ_GEMV=0\nexport GEMV_TOO=0\n" >> "$S/env"; echo "GEMV failed: cuBLAS from here on"; }
  [ -f "$S/env" ] && . "$S/env"
  # The 8B shape's GEMMs through the GEMV and cuBLAS, timed in the same process.
  timeout 120 "$S/kvq-gpu" gemm-bench > "$S/gemm.txt" 2>&1; echo "gemm-bench rc=$?"; cat "$S/gemm.txt"
  KVQ_MODEL="$small" timeout 240 "$S/kvq-gpu" resident-check > "$S/resident.txt" 2>&1; echo "resident-check rc=$?"
  grep -E "FAIL|tokens|greedy|ppl|SKIPPED" "$S/resident.txt" | head -n 20
  cp "$S/check.txt" "$S/engine.txt" "$S/resident.txt" "$S/gemm.txt" "$S"/check-split.txt "$OUT/" 2>/dev/null
  ;;
llama-small)
  stage_parts
  [ -f "$small" ] || { echo "no model: run the stage call first"; exit 1; }
  wait_build
  tail -3 "$S/llama-build.log"
  write_big "$small"
  R=$S/res-small; mkdir -p "$R"
  for t in $LLAMA_TYPES; do
    llama_bench "$small" "$t" "$SMALL_CTX" "$R/llama-$t.jsonl" $SMALL_BATCH >/dev/null
    [ "$SMALL_B32" = 1 ] && llama_bench "$small" "$t" 4096,16384 "$R/llama-$t.jsonl" 32 >/dev/null
  done
  grep -h '^{' "$R"/llama-*.jsonl | cut -c1-400
  ;;
kvq-small)
  stage_parts
  R=$S/res-small; mkdir -p "$R"
  kv=(); for p in $KVQ_PLANS_SMALL; do kv+=(--kv "$p"); done
  batches=$(echo $SMALL_BATCH | tr ' ' ','); [ "$SMALL_B32" = 1 ] && batches="$batches,32"
  peers=(); for t in $LLAMA_TYPES; do peers+=(--peer "llama.cpp $t=$R/llama-$t.jsonl"); done
  timeout 500 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model "$small" --name "SmolLM2-135M Q4_1" --ctx "$SMALL_CTX" \
    --batch "$batches" --steps 32 --json "$R/bench.json" "${kv[@]}" "${peers[@]}" \
    2>&1 | tee "$R/kvq.log" | grep -v '^\s*$' | tail -n 120
  if [ "$NO_GRAPHS_TOO" = 1 ]; then
    timeout 200 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --no-graphs --model "$small" --name "SmolLM2-135M Q4_1, no graphs" --ctx 4096,32768 \
      --batch 1,8 --steps 32 --json "$R/bench-nographs.json" --kv fp16 "${peers[@]}" 2>&1 | tee "$R/kvq-nographs.log" | grep "T=" 
  fi
  # Formats whose GPU encoders are newer (QJL, DecoQuant), in a run of their own so that a slow fill
  # cannot cost the main table.
  if [ -n "${EXTRA_PLANS_SMALL:-}" ]; then
    kx=(); for p in $EXTRA_PLANS_SMALL; do kx+=(--kv "$p"); done
    timeout 240 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --model "$small" --name "SmolLM2-135M Q4_1, QJL and DecoQuant" --ctx "$SMALL_CTX" \
      --batch "$(echo $SMALL_BATCH | tr ' ' ',')" --steps 32 --json "$R/bench-extra.json" "${kx[@]}" "${peers[@]}" \
      2>&1 | tee "$R/kvq-extra.log" | grep "T=" | tail -n 40
  fi
  tar czf "$OUT/bench-small.tar.gz" -C "$R" .
  tail -2 "$S/gguf.log"
  ;;
big)
  stage_parts
  wait_build
  wait_gguf; ls -la "$big"
  R=$S/res-big; mkdir -p "$R"
  llama_big
  big_peers
  big_main "${peers[@]}" | tail -n 60
  if [ "$NO_GRAPHS_TOO" = 1 ]; then
    timeout 120 "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --no-graphs --model "$big" --name "Llama-3-8B shape, no graphs" --ctx 4096 \
      --batch 1,8 --steps 16 --json "$R/bench-nographs.json" --kv fp16 "${peers[@]}" 2>&1 | tee "$R/kvq-nographs.log" | grep "T="
  fi
  big_cublas 300
  ;;
big-all)
  # The 8B shape in ONE call on a fresh machine (carry .carry-peers and .carry-bin): the machine may be
  # taken back between calls, so nothing here relies on an earlier one. kvq runs first, on the GPU, while
  # llama.cpp builds at low CPU priority (nice 19; kvq replays CUDA graphs, about 0.2 ms of host work per
  # step); llama.cpp runs after its build on an idle machine, and its figures are merged with --replot.
  # Each stage leaves its tarball in $OUT before the next, so a cut-off call still returns what ran.
  stage_parts
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  start_build 19
  write_big "$S/tokenizer.gguf"
  wait_gguf
  R=$S/res-big; mkdir -p "$R"
  big_main | grep -E "loaded|T="
  wait_build; tail -2 "$S/llama-build.log"
  llama_big | cut -c1-300
  big_peers
  "$S/kvq" bench decode ${KVQ_BENCH_EXTRA:-} --replot --json "$R/bench.json" --batch "$(big_batches)" "${peers[@]}" 2>&1 | tail -n 3
  cut -c1-220 "$R/bench.md"
  tar czf "$OUT/bench-big.tar.gz" -C "$R" .
  # Then, as time allows: the formats of EXTRA_PLANS_BIG, and the fp16 points through cuBLAS.
  [ -n "${EXTRA_PLANS_BIG:-}" ] && big_extra "${EXTRA_TIMEOUT:-200}" | grep -E "loaded|T="
  big_cublas 200
  ;;
big-extra)
  # More kvq plans on the 8B shape after `big` on the same machine (its llama.cpp JSONL are the peers):
  # formats whose fills take longer (QJL's f64 sign sums, DecoQuant), in a call of their own.
  stage_parts
  R=$S/res-big; [ -f "$big" ] || { echo "no 8B GGUF: run stage and big first"; exit 1; }
  : "${EXTRA_PLANS_BIG:?set EXTRA_PLANS_BIG}"
  big_peers
  big_extra "${EXTRA_TIMEOUT:-400}" | tail -n 40
  ;;
*) echo "usage: bench-gpu.sh stage|check|llama-small|kvq-small|big|big-extra|big-all"; exit 2 ;;
esac
