# Re-runs `kvq tune`'s greedy allocation (crates/kvq-model/src/tune.rs, `allocate`) on the probes of
# tuned-nf.report.json with the summed-KL target that gives the most slots for at most BITS bits/elem,
# and writes that plan as a plan file (the format `kvq tune` writes). No model run: probes only.
# Usage: reallocate.py BITS OUT [REPORT [CTX]] (REPORT: another tune report, default tuned-nf.report.json;
# CTX: count each candidate's `sink=N` f16 tokens in its bits, N x 16 / CTX, as eval's bits/elem does at
# windows of CTX; the probes' bits leave them out).
import json, sys
from collections import Counter
bits_max = float(sys.argv[1])
out = sys.argv[2]
rep = json.load(open(sys.argv[3] if len(sys.argv) > 3 else 'docs/results/2026-12-06-lowbits/tuned-nf.report.json'))
sink_ctx = int(sys.argv[4]) if len(sys.argv) > 4 else 0
def sink_bits(fmt):
    for opt in fmt.split(':', 1)[-1].split(','):
        if opt.startswith('sink=') and sink_ctx:
            return int(opt[5:]) * 16 / sink_ctx
    return 0.0
slots = {}
for p in rep['probes']:
    slots.setdefault((p['layer'], p['stream']), [(16.0, 0.0, 'fp16')]).append((p['bits'] + sink_bits(p['format']), p['kl'], p['format']))
keys = sorted(slots, key=lambda k: (k[0], 0 if k[1] == 'k' else 1))
S = [sorted(slots[k], key=lambda o: o[0]) for k in keys]
def allocate(target):
    cost = lambda s, i: max(s[i][1], 0.0)
    pick = [0] * len(S)
    total = sum(cost(s, 0) for s in S)
    while total > target:
        best = None
        for si, s in enumerate(S):
            c = pick[si]
            for j in range(c + 1, len(s)):
                gain = cost(s, c) - cost(s, j)
                extra = max(s[j][0] - s[c][0], 1e-9)
                if gain <= 0:
                    continue
                rate = gain / extra
                if best is None or rate > best[0]:
                    best = (rate, si, j)
        if best is None:
            break
        _, si, j = best
        total -= cost(S[si], pick[si]) - cost(S[si], j)
        pick[si] = j
    return pick
def bits(pick):
    return sum(S[i][j][0] for i, j in enumerate(pick)) / len(S)
lo, hi = 0.0, 10.0  # the lowest target whose plan is within bits_max
for _ in range(60):
    mid = (lo + hi) / 2
    if bits(allocate(mid)) <= bits_max:
        hi = mid
    else:
        lo = mid
pick = allocate(hi)
pred = sum(max(S[i][j][1], 0) for i, j in enumerate(pick))
fmts = [S[i][j][2] for i, j in enumerate(pick)]
default = Counter(fmts).most_common(1)[0][0]
layers = {}
for (layer, stream), f in zip(keys, fmts):
    if f != default:
        layers.setdefault(str(layer), {})[stream] = f
json.dump({'default': default, 'layers': layers}, open(out, 'w'), indent=2)
print(f'target {hi:.5f} predicted {pred:.5f} bits {bits(pick):.4f}', Counter((k[1], f.split(",")[0]) for k, f in zip(keys, fmts)))
