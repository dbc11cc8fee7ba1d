# Sourced by the one-call device scripts (profile-step.sh, b1-step.sh, attn-profile.sh,
# stages-sweep.sh): CUDA's libraries on the path, $OUT, the machine's stash $S with the carried
# binaries (.carry-bin/*.xz) unpacked there once, and $NCU (Nsight Compute).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/kvq-out}; mkdir -p "$OUT"
S=/root/stash; mkdir -p "$S"
[ -d .carry-bin ] && cp -r .carry-bin/. "$S"/
for b in kvq kvq-gpu; do [ -f "$S/$b.xz" ] && [ ! -x "$S/$b" ] && xz -dc "$S/$b.xz" > "$S/$b" && chmod +x "$S/$b"; done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
