#!/bin/bash
# 4-window screen 2: group 8 with per-group books (books=group), group 16 shared (run from the repository root)
K=target/release/kvq; R=docs/results/2026-12-06-rvq-smallgroup
P8="group=8,codes=256,groups=strided,window=0,books=group,codebooks=data/rvq-lcet10-g8pg-256x3.safetensors"
G16="group=16,codes=256,groups=strided,window=0,codebooks=data/rvq-lcet10-g16-256x6.safetensors"
nice -n 15 $K eval ppl --device cpu --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text data/corpus/alice29.txt --ctx 1024 --max-windows 4 --json $R/screen2-4w.json \
  --kv "rvq:$P8,depth=2" \
  --kv "k=rvq:$P8,depth=2;v=rvq:$G16,depth=3" \
  --kv "k=rvq:$P8,depth=3;v=rvq:$P8,depth=2" \
  --kv "rvq:$P8,depth=3" \
  --kv "k=rvq:$P8,depth=3;v=rvq:$G16,depth=5" \
  --kv "rvq:$G16,depth=4" \
  --kv "k=rvq:$G16,depth=6;v=rvq:$G16,depth=5" \
  --kv "rvq:group=32,codes=256,groups=strided,window=0,codebooks=data/rvq-lcet10-256x8.safetensors,depth=8"
