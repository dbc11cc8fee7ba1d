#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into the project-local, git-ignored .cuda/ so that `cargo build`
# compiles the CUDA kernels on machines without the CUDA toolkit (CI, developer laptops).
# Pinned to 13.0: the GPU machine's driver is CUDA 13.0 and PTX from a newer nvcc will not load there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/.cuda"
nvcc="$dir/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -q "release 13.0"; then
  echo "nvcc already installed: $nvcc"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --target "$dir" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
chmod +x "$dir"/nvidia/cu13/bin/* 2>/dev/null || true
"$nvcc" --version | tail -2
echo "nvcc installed: $nvcc"
