#!/bin/bash
# 4-window screen of group-8 RVQ plans (run from the repository root)
K=target/release/kvq; R=docs/results/2026-12-06-rvq-smallgroup
B8=data/rvq-lcet10-g8-256x3.safetensors; B32=data/rvq-lcet10-256x8.safetensors
G8="group=8,codes=256,groups=strided,window=0,codebooks=$B8"; G32="group=32,codes=256,groups=strided,window=0,codebooks=$B32"
NF="rot=on,clip=mse,levels=nf"
nice -n 15 $K eval ppl --device cpu --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text data/corpus/alice29.txt --ctx 1024 --max-windows 4 --json $R/screen-4w.json \
  --kv "rvq:$G8,depth=2" \
  --kv "k=rvq:$G8,depth=2;v=rvq:$G8,depth=1" \
  --kv "k=rvq:$G8,depth=2;v=rvq:$G32,depth=7" \
  --kv "rvq:$G8,depth=3" \
  --kv "k=rvq:$G8,depth=3;v=rvq:$G8,depth=2" \
  --kv "k=kivi:bits=4,group=128,window=0,prerope=on,levels=nf;v=rvq:$G8,depth=1"
