# Sourced by the device scripts (bench-gpu.sh, verify-gpu.sh, profile-step.sh, step-8b.sh, ...): CUDA's libraries on the path, $OUT, the machine's stash $S with the carried
# binaries (.carry-bin/*.xz) unpacked there once, and $NCU (Nsight Compute).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/kvq-out}; mkdir -p "$OUT"
S=/root/stash; mkdir -p "$S"
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
  PYTHONPATH=/tmp/site timeout 300 python3 "$d/random-llama-gguf.py" "$src" "$out" "$shape" f16 | tail -n 1
  echo "$shape GGUF rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
}

# llama_f16_points BIN_DIR GGUF JSONL: once the background llama.cpp build has put llama-batched-bench in
# BIN_DIR (waits up to 5 minutes), its f16-cache decode at B=1 and B=8 x 4k and 32k prompts (64 generated
# tokens, -c sized for each batch), one JSON line per point appended to JSONL (stderr to JSONL.err).
llama_f16_points() {
  local lb=$1 gguf=$2 out=$3 b i
  for i in $(seq 1 60); do [ -x "$lb/llama-batched-bench" ] && break; sleep 5; done
  tail -n 2 "$S/llama-build.log"
  for b in 1 8; do
    [ -x "$lb/llama-batched-bench" ] || break
    timeout 150 "$lb/llama-batched-bench" -m "$gguf" -ngl 99 -fa on -ctk f16 -ctv f16 -c $(( (32768 + 64) * b + 256 )) -b 2048 -ub 512 \
      -npp 4096,32768 -ntg 64 -npl $b --output-format jsonl 2>>"$out.err" | grep '^{' | tee -a "$out" | cut -c1-300
  done
}
