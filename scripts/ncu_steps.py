"""Summarises an `ncu --csv --metrics gpu__time_duration.sum` log of `kvq bench decode`: the last
`steps` decode steps (a step starts at its embedding kernel), per kernel name: launches per step, mean
microseconds, share of the step's summed kernel time."""
import csv
import io
import sys
from collections import OrderedDict

path, steps = sys.argv[1], int(sys.argv[2])
lines = [l for l in open(path, errors="replace") if l.startswith('"')]
rows = list(csv.DictReader(io.StringIO("".join(lines))))
rows = [r for r in rows if r.get("Metric Name") == "gpu__time_duration.sum"]
names = [r["Kernel Name"].split("(")[0][:70] for r in rows]
dur = [float(r["Metric Value"].replace(",", "")) / 1000.0 for r in rows]  # ns -> us
starts = [i for i, nm in enumerate(names) if nm.startswith("kvq_model_embed")]
if len(starts) < steps + 1:
    print(f"{len(starts)} embedding launches in {len(names)} kernels: too few steps")
    sys.exit(0)
# The last `steps` complete steps: from the (steps+1)-th last embed up to the last one.
a, b = starts[-steps - 1], starts[-1]
tail_n, tail_d = names[a:b], dur[a:b]
agg = OrderedDict()
for nm, d in zip(tail_n, tail_d):
    c, t = agg.get(nm, (0, 0.0))
    agg[nm] = (c + 1, t + d)
total = sum(tail_d) / steps
print(f"{len(tail_n) / steps:.1f} kernels per step, summed kernel time {total:.1f} us per step")
for nm, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"  {nm:70s} {c / steps:6.1f}/step {t / c:8.2f} us {100 * t / steps / total:5.1f}%")
