#!/bin/bash
# 16 windows: per-layer mixes of group-16 per-group RVQ (run from the repository root). Layers chosen by
# the tuner's probes of docs/results/2026-12-06-lowbits/tuned-nf.report.json (KIVI 2-bit, KL on lcet10.txt):
# b1 (2.2 bits): depth 4 everywhere, keys depth 5 in the 6 most key-sensitive layers, values depth 3 in
#   the 12 least value-sensitive; b2 (3.0 bits): keys depth 6, values depth 6 in the 15 most
#   value-sensitive layers and depth 4 in the other 15; then uniform depth 4 (2.25 bits) as reference.
K=target/release/kvq; R=docs/results/2026-12-06-rvq-smallgroup
P16="group=16,codes=256,groups=strided,window=0,books=group,codebooks=data/rvq-lcet10-g16pg-256x6.safetensors"
nice -n 15 $K eval ppl --device cpu --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text data/corpus/alice29.txt --ctx 1024 --max-windows 16 --json $R/smallgroup-16w-b.json \
  --kv "rvq:$P16,depth=4;k@18=rvq:$P16,depth=5;k@10=rvq:$P16,depth=5;k@19=rvq:$P16,depth=5;k@17=rvq:$P16,depth=5;k@23=rvq:$P16,depth=5;k@12=rvq:$P16,depth=5;v@7=rvq:$P16,depth=3;v@20=rvq:$P16,depth=3;v@5=rvq:$P16,depth=3;v@6=rvq:$P16,depth=3;v@17=rvq:$P16,depth=3;v@4=rvq:$P16,depth=3;v@25=rvq:$P16,depth=3;v@22=rvq:$P16,depth=3;v@26=rvq:$P16,depth=3;v@29=rvq:$P16,depth=3;v@21=rvq:$P16,depth=3;v@8=rvq:$P16,depth=3" \
  --kv "k=rvq:$P16,depth=6;v=rvq:$P16,depth=5;v@7=rvq:$P16,depth=4;v@20=rvq:$P16,depth=4;v@5=rvq:$P16,depth=4;v@6=rvq:$P16,depth=4;v@17=rvq:$P16,depth=4;v@4=rvq:$P16,depth=4;v@25=rvq:$P16,depth=4;v@22=rvq:$P16,depth=4;v@26=rvq:$P16,depth=4;v@29=rvq:$P16,depth=4;v@21=rvq:$P16,depth=4;v@8=rvq:$P16,depth=4;v@10=rvq:$P16,depth=4;v@15=rvq:$P16,depth=4;v@28=rvq:$P16,depth=4;v@14=rvq:$P16,depth=6;v@23=rvq:$P16,depth=6;v@0=rvq:$P16,depth=6;v@18=rvq:$P16,depth=6;v@27=rvq:$P16,depth=6;v@19=rvq:$P16,depth=6;v@12=rvq:$P16,depth=6;v@9=rvq:$P16,depth=6;v@13=rvq:$P16,depth=6;v@24=rvq:$P16,depth=6;v@11=rvq:$P16,depth=6;v@16=rvq:$P16,depth=6;v@3=rvq:$P16,depth=6;v@2=rvq:$P16,depth=6;v@1=rvq:$P16,depth=6" \
  --kv "rvq:$P16,depth=4"
