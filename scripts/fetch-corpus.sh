#!/usr/bin/env bash
# Fetches the evaluation and calibration texts: real English (quotations of people, wisdom,
# songs and poems, science, computing) from Debian's `fortunes` package (BSD-licensed fortune-mod
# data), pinned and checksum-verified. Writes data/eval.txt and data/calib.txt (disjoint files:
# RVQ codebooks are never calibrated on the evaluation text).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"; out="$root/data"; mkdir -p "$out/cache"
ver="1:1.99.1-7.3"; sum="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"
deb=$(ls "$out"/cache/fortunes_*_all.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  (cd "$out/cache" && { apt-get download "fortunes=$ver" 2>/dev/null || { apt-get update -qq && apt-get download "fortunes=$ver"; }; })
  deb=$(ls "$out"/cache/fortunes_*_all.deb | head -1)
fi
echo "$sum  $deb" | sha256sum -c - >/dev/null
rm -rf "$out/cache/x"; dpkg -x "$deb" "$out/cache/x"
f="$out/cache/x/usr/share/games/fortunes"
# Quotations separated by '%' lines become paragraphs.
join() { for n in "$@"; do sed 's/^%$//' "$f/$n"; done; }
join people wisdom songs-poems art humorists love > "$out/eval.txt"
join science computers work politics definitions miscellaneous > "$out/calib.txt"
wc -c "$out/eval.txt" "$out/calib.txt"
