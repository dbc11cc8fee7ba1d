"""Summarises `kvq bench decode` JSON's per-step GPU times (gpu_ms_each_step): per point the step
time, the median and maximum step, and the steps above 1.2x the median (a block seal's step)."""
import json
import statistics as st
import sys

for p in json.load(open(sys.argv[1]))["points"]:
    each = p.get("gpu_ms_each_step") or []
    if p.get("status") != "ok" or not each:
        continue
    med = st.median(each)
    slow = [(i, round(x, 3)) for i, x in enumerate(each) if x > 1.2 * med]
    print(f"{p['plan'][:44]:44s} T={p['ctx']} B={p['batch']}: {p['ms_per_step']:.3f} ms/step, "
          f"GPU mean {st.mean(each):.3f} median {med:.3f} max {max(each):.3f}; slow steps {slow}")
