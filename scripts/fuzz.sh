#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for N seconds (default 600), one at a time, at
# low priority. Corpora: fuzz/corpus/<target> (seed-* files tracked, the rest generated and ignored);
# crashes: fuzz/artifacts/<target>. Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo fuzz pass its
# nightly-only flags. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
secs="${1:-600}"
shift || true
cd "$(dirname "$0")/../fuzz"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(plan_parse block_decode gguf_load hf_load)
export RUSTC_BOOTSTRAP=1
# -s none: no sanitizer (every target is safe Rust; builds far faster on small machines);
# -a: debug assertions, so arithmetic overflow panics too.
flags=(-s none -a)
nice -n 10 cargo fuzz build "${flags[@]}"
for t in "${targets[@]}"; do
    case "$t" in
        gguf_load | hf_load) max_len=16384 ;;
        *) max_len=4096 ;;
    esac
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: ${secs}s, -max_len=$max_len"
    nice -n 10 cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -rss_limit_mb=4096 -timeout=20 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tee "artifacts/$t.log" || echo "== $t: stopped with a finding"
done
