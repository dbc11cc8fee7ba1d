#!/bin/bash
# 16 windows: group-16 per-group RVQ keys (depth 6, 3.25 bits) with 2-bit rotated, clipped, Lloyd-Max KIVI
# values (2.5 bits): 2.875 bits/elem; then fp16 on the 4 windows of the screens (their ratio base).
K=target/release/kvq; R=docs/results/2026-12-06-rvq-smallgroup
P16="group=16,codes=256,groups=strided,window=0,books=group,codebooks=data/rvq-lcet10-g16pg-256x6.safetensors"
M="--device cpu --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text data/corpus/alice29.txt --ctx 1024"
nice -n 15 $K eval ppl $M --max-windows 16 --json $R/smallgroup-16w-c.json \
  --kv "k=rvq:$P16,depth=6;v=kivi:bits=2,group=64,window=0,rot=on,clip=mse,levels=nf"
nice -n 15 $K eval ppl $M --max-windows 4 --json $R/fp16-4w.json --kv fp16
