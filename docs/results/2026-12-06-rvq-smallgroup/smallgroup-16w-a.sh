#!/bin/bash
# 16 windows (the main sweep's setting): the candidates at <= 2.2 and <= 3.0 bits/elem (run from the repository root)
K=target/release/kvq; R=docs/results/2026-12-06-rvq-smallgroup
P8="group=8,codes=256,groups=strided,window=0,books=group,codebooks=data/rvq-lcet10-g8pg-256x3.safetensors"
P16="group=16,codes=256,groups=strided,window=0,books=group,codebooks=data/rvq-lcet10-g16pg-256x6.safetensors"
# <= 2.2 bits: every stream 2.25 bits, values one step lower in the layers whose values the tuner's
# probes (KIVI 2-bit, KL on lcet10.txt, docs/results/2026-12-06-lowbits/tuned-nf.report.json) found least
# sensitive: 7, 20, 5 (group 8: -1 bit each) or 7, 20, 5, 6, 17, 4 (group 16: -0.5 bit each); 2.2 bits/elem.
V8="v@7=rvq:$P8,depth=1;v@20=rvq:$P8,depth=1;v@5=rvq:$P8,depth=1"
V16="v@7=rvq:$P16,depth=3;v@20=rvq:$P16,depth=3;v@5=rvq:$P16,depth=3;v@6=rvq:$P16,depth=3;v@17=rvq:$P16,depth=3;v@4=rvq:$P16,depth=3"
nice -n 15 $K eval ppl --device cpu --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text data/corpus/alice29.txt --ctx 1024 --max-windows 16 --json $R/smallgroup-16w-a.json \
  --kv "rvq:$P8,depth=2;$V8" \
  --kv "k=rvq:$P8,depth=3;v=rvq:$P16,depth=5" \
  --kv "rvq:$P16,depth=4;$V16" \
  --kv "k=rvq:$P16,depth=6;v=rvq:$P16,depth=5"
