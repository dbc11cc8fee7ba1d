#!/usr/bin/env bash
# Fetches kvq's evaluation and calibration text: the English texts of the Canterbury corpus, which
# the brotli source distribution on PyPI ships as test data (brotli==1.2.1, MIT; the texts are
# public domain, from Project Gutenberg). Real text, never generated. Checksums are verified on the
# archive and on every extracted file; CRLF line ends are normalized to LF (checksums are of the
# normalized files).
#
#   data/corpus/alice29.txt   Alice's Adventures in Wonderland (Carroll), 145 KiB: evaluation text
#   data/corpus/lcet10.txt    Library of Congress workshop on electronic texts (1992), 409 KiB: calibration
#   data/corpus/plrabn12.txt  Paradise Lost (Milton), 460 KiB
#   data/corpus/asyoulik.txt  As You Like It (Shakespeare), 122 KiB
#
# Usage: bash scripts/fetch-canterbury.sh [DIR]   (default DIR: data/corpus at the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/data/corpus}"
pkg="brotli==1.2.1"
sdist="brotli-1.2.1.tar.gz"
sdist_sha="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
# sha256 of each text after CRLF -> LF.
declare -A want=(
  [alice29.txt]=4cbce86540bcef439f901c89de486d295aa3848e8c4cbc911561054479e73960
  [lcet10.txt]=938e69e61b3411d8a9e2e630f4265000d810f3dbf66bac58cac19493753526ec
  [plrabn12.txt]=7f498b78f161d81bf4e121e80fa052b491babb64de44b6364304a117db5fbbb3
  [asyoulik.txt]=eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc
)

fail() { echo "fetch-corpus: $*" >&2; exit 1; }
command -v python3 >/dev/null || fail "python3 not found (needed for 'python3 -m pip download')"
python3 -m pip --version >/dev/null 2>&1 || fail "python3 has no pip (install python3-pip)"

mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --no-binary :all: --disable-pip-version-check -q "$pkg" -d "$tmp" \
  || fail "pip download $pkg failed"
[ -f "$tmp/$sdist" ] || fail "pip produced no $sdist"
got="$(sha256sum "$tmp/$sdist" | cut -d' ' -f1)"
[ "$got" = "$sdist_sha" ] || fail "$sdist: sha256 $got, expected $sdist_sha"

for f in "${!want[@]}"; do
  tar -xzf "$tmp/$sdist" -C "$tmp" "brotli-1.2.1/tests/testdata/$f" || fail "$sdist has no tests/testdata/$f"
  python3 -c 'import sys; d = open(sys.argv[1], "rb").read(); open(sys.argv[2], "wb").write(d.replace(b"\r\n", b"\n"))' \
    "$tmp/brotli-1.2.1/tests/testdata/$f" "$out/$f"
  got="$(sha256sum "$out/$f" | cut -d' ' -f1)"
  if [ "$got" != "${want[$f]}" ]; then
    rm -f "$out/$f"
    fail "$f: sha256 $got, expected ${want[$f]}"
  fi
  echo "$out/$f  $(wc -c <"$out/$f") bytes  sha256 ok"
done
