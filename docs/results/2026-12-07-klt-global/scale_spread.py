# Per-token spread of value scales inside each 64-token block, from the meta=8 scale codes printed by a
# build with meta8-scale-stats.patch applied:
#   KVQ_META8_STATS=1 kvq eval ppl --device cpu --model $M --text data/corpus/alice29.txt --ctx 1024 \
#     --max-windows 1 --kv "k=fp16;v=kivi:bits=2,group=64,window=0,rot=on,clip=mse,levels=nf,meta=8" 2>&1 | grep '^M8' > m8.txt
#   python3 scale_spread.py m8.txt
import math, sys
rows = [list(map(int, l.split()[1:])) for l in open(sys.argv[1])]
g = []
for r in rows:
    s2 = [2 ** (-c / 8) for c in r if c != 255]  # s^2 relative to the block scale
    am = sum(s2) / len(s2)
    gm = math.exp(sum(math.log(x) for x in s2) / len(s2))
    g.append(am / gm)
g.sort()
print('blocks', len(rows), 'AM/GM of s^2 per block: median %.2f p10 %.2f p90 %.2f' % (g[len(g) // 2], g[len(g) // 10], g[9 * len(g) // 10]))
print('bits equivalent (median) %.3f' % (0.5 * math.log2(g[len(g) // 2])))
