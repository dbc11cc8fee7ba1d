#!/usr/bin/env python3
"""A/B table of `verify-gpu.sh ab`'s ab.jsonl: per format and point, the mean time of each build over its
reps ("old" first, then any further old-* builds, "new" last), each build's time over old's, the new
build's time against fp16's new time, and the share of the same run's device copy bandwidth ("% of copy
BW") each build reaches on its own bytes. Usage: ab_report.py ab.jsonl"""
import json
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
copy_gbps = next((r["copy_gbps"] for r in rows if "copy_gbps" in r), None)  # sdpa_bench.py --copy-only
t = defaultdict(list)
gb = {}
for r in rows:
    if "build" not in r:
        continue
    key = (r["format"], r["batch"], r["context"])
    t[key + (r["build"],)].append(r["ms"])
    gb[key] = r["bytes"]
builds = sorted({k[3] for k in t}, key=lambda b: (b != "old", b == "new", b))
later = [b for b in builds if b != "old"]
mean = lambda v: sum(v) / len(v) if v else float("nan")
print(f"copy bandwidth of the run: {copy_gbps} GB/s\n")
print("| format | B | T | " + " | ".join(f"{b} ms" for b in builds) + " | "
      + " | ".join(f"{b}/old" for b in later) + " | new vs fp16 | % of copy BW " + " -> ".join(builds) + " |")
print("|---" * (3 + len(builds) + len(later) + 2) + "|")
keys = sorted({k[:3] for k in t}, key=lambda k: (k[1], k[2], k[0] != "fp16", k[0]))
for f, b, c in keys:
    m = {x: mean(t.get((f, b, c, x), [])) for x in builds}
    mf = mean(t.get(("fp16", b, c, "new"), []))
    bw = lambda ms: f"{gb[(f, b, c)] / ms / 1e6 / copy_gbps * 100:.0f}%" if copy_gbps and ms == ms else "-"
    mo = m.get("old", float("nan"))
    print(f"| {f} | {b} | {c} | " + " | ".join(f"{m[x]:.4f}" for x in builds) + " | "
          + " | ".join(f"{m[x] / mo:.3f}" for x in later) + f" | {m.get('new', float('nan')) / mf:.3f} | "
          + " -> ".join(bw(m[x]) for x in builds) + " |")
