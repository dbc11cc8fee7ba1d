#!/usr/bin/env bash
# The llama.cpp column of the quality sweep (issue 12): builds llama.cpp's `llama-perplexity` (CPU,
# only that target) from the source that the PyPI sdist of llama-cpp-python vendors, runs it over the
# same model and text with several KV-cache types, and writes JSON that `kvq eval sweep --peer-json`
# merges: each type's perplexity as a ratio to llama.cpp's own f16 run, at the type's bits/elem.
# Nothing of llama.cpp is committed: source and build live under WORK (git-ignored by default).
#
# Usage: bash scripts/peer-ppl.sh [--text FILE] [--model GGUF] [--ctx N] [--chunks N] [--out JSON]
#                                 [--work DIR] [--threads N]
# Defaults: data/corpus/alice29.txt, models/SmolLM2-135M-Instruct.Q4_1.gguf, ctx 1024, 16 chunks
# (llama-perplexity scores the second half of each non-overlapping window: 16 x 512 = 8192 tokens;
# a run's log under WORK/logs is reused when it already reached that many chunks),
# out/peer-llamacpp.json, work dir out/peers. Needs python3 with pip, a C/C++ compiler; cmake and
# ninja come from PyPI. The build takes about 4 minutes on 2 idle cores; a 16-chunk run about 2
# minutes (8 on a loaded machine).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
text="$root/data/corpus/alice29.txt"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
ctx=1024
chunks=16
out="$root/out/peer-llamacpp.json"
work="$root/out/peers"
threads="$(nproc)"
ver="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --ctx) ctx="$2"; shift 2 ;;
    --chunks) chunks="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    *) echo "peer-ppl: unknown argument $1" >&2; exit 2 ;;
  esac
done
fail() { echo "peer-ppl: $*" >&2; exit 1; }
[ -f "$text" ] || fail "--text $text not found (bash scripts/fetch-canterbury.sh)"
[ -f "$model" ] || fail "--model $model not found (bash models/fetch.sh)"
mkdir -p "$work" "$(dirname "$out")"
work="$(cd "$work" && pwd)"

# 1. Source: llama-cpp-python's sdist vendors llama.cpp.
src="$work/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
  echo "peer-ppl: fetching llama-cpp-python==$ver sdist" >&2
  rm -rf "$work/sdist" && mkdir -p "$work/sdist"
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python --disable-pip-version-check \
    -d "$work/sdist" "llama-cpp-python==$ver"
  tar xzf "$work/sdist/llama_cpp_python-$ver.tar.gz" -C "$work/sdist"
  rm -rf "$src" && mv "$work/sdist/llama_cpp_python-$ver/vendor/llama.cpp" "$src"
  rm -rf "$work/sdist"
fi

# 2. Build tools from PyPI (their real binaries, never their Python launchers: ninja's launcher looks
#    for `ninja` on PATH and would find itself), then only the llama-perplexity target.
tools="$work/tools"
cmake_bin="$tools/py/cmake/data/bin/cmake"
ninja_bin="$tools/py/bin/ninja"
if [ ! -x "$cmake_bin" ] || [ ! -x "$ninja_bin" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$tools/py" cmake ninja
fi
timeout 20 "$ninja_bin" --version >/dev/null || fail "$ninja_bin does not run"
timeout 20 "$cmake_bin" --version >/dev/null || fail "$cmake_bin does not run"
bin="$src/build/bin/llama-perplexity"
if [ ! -x "$bin" ]; then
  echo "peer-ppl: building llama-perplexity (CPU) in $src/build" >&2
  (cd "$src" && "$cmake_bin" -B build -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja_bin" \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null &&
    "$cmake_bin" --build build -j"$threads" --target llama-perplexity)
fi
[ -x "$bin" ] || fail "no $bin after the build"

# 3. Runs: K type, V type. A quantized V cache needs flash attention (-fa on), so every run uses it.
runs=(
  "f16 f16" "q8_0 q8_0" "q5_0 q5_0" "q4_1 q4_1" "q4_0 q4_0" "iq4_nl iq4_nl" "q4_0 f16" "f16 q4_0"
)
[ -n "${PEER_RUNS:-}" ] && IFS=',' read -r -a runs <<<"$PEER_RUNS"  # e.g. PEER_RUNS="f16 f16,q4_0 q4_0"
logs="$work/logs"
mkdir -p "$logs"
rows="$work/rows.tsv"
: >"$rows"
for r in "${runs[@]}"; do
  set -- $r
  log="$logs/ppl-$1-$2.log"
  # llama-perplexity prints the running estimate after each chunk as [i]ppl: the value at
  # [chunks] is the perplexity of the first `chunks` windows, so a longer earlier run is reused.
  ppl=$(grep -o "\[$chunks\][0-9.]*" "$log" 2>/dev/null | head -1 | cut -d']' -f2 || true)
  secs=0
  if [ -z "$ppl" ]; then
    echo "peer-ppl: -ctk $1 -ctv $2" >&2
    t0=$(date +%s)
    "$bin" -m "$model" -f "$text" -c "$ctx" --chunks "$chunks" -fa on -ctk "$1" -ctv "$2" \
      -t "$threads" >"$log" 2>&1 || fail "llama-perplexity -ctk $1 -ctv $2 failed, see $log"
    secs=$(($(date +%s) - t0))
    ppl=$(grep -o "\[$chunks\][0-9.]*" "$log" | head -1 | cut -d']' -f2)
  fi
  [ -n "$ppl" ] || fail "no perplexity after chunk $chunks in $log"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$ppl" "$secs" >>"$rows"
  echo "peer-ppl:   -ctk $1 -ctv $2: ppl $ppl ($secs s)" >&2
done

# 4. JSON: bits/elem of each ggml type (block bytes x 8 / block elements), K and V averaged.
commit=$(sed -n 's/.*build: \([0-9]*\) (\([0-9a-f]*\)).*/\1-\2/p' "$logs/ppl-f16-f16.log" | head -1)
python3 - "$rows" "$out" "$model" "$text" "$ctx" "$chunks" "$ver" "${commit:-unknown}" <<'EOF'
import json, sys
rows, out, model, text, ctx, chunks, ver, commit = sys.argv[1:9]
bits = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5,
        "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5}
res = []
for line in open(rows):
    k, v, ppl, secs = line.rstrip("\n").split("\t")
    res.append({"kv": f"llama.cpp -ctk {k} -ctv {v}", "k_type": k, "v_type": v,
                "bits_per_elem": (bits[k] + bits[v]) / 2, "ppl": float(ppl), "seconds": float(secs)})
base = next(r["ppl"] for r in res if r["k_type"] == "f16" and r["v_type"] == "f16")
for r in res:
    r["ratio"] = r["ppl"] / base
doc = {"peer": "llama.cpp llama-perplexity (CPU, -fa on)", "llama_cpp_python": ver, "build": commit,
       "model": model, "text": text, "ctx": int(ctx), "chunks": int(chunks),
       "scored_tokens": int(chunks) * (int(ctx) // 2), "results": res}
json.dump(doc, open(out, "w"), indent=2)
print(out)
EOF
