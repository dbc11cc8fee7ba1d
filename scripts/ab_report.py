#!/usr/bin/env python3
"""A/B table of `verify-gpu.sh ab`'s ab.jsonl: per format and point, the mean time of each build over its
reps, new/old, the new build's time against fp16's new time, and the share of the same run's device copy
bandwidth ("% of copy BW") each build reaches on its own bytes. Usage: ab_report.py ab.jsonl"""
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
print(f"copy bandwidth of the run: {copy_gbps} GB/s\n")
print("| format | B | T | old ms | new ms | new/old | new vs fp16 | % of copy BW old -> new |")
print("|---|---|---|---|---|---|---|---|")
keys = sorted({k[:3] for k in t}, key=lambda k: (k[1], k[2], k[0] != "fp16", k[0]))
for f, b, c in keys:
    new = t.get((f, b, c, "new"), [])
    old = t.get((f, b, c, "old"), [])
    mn = sum(new) / len(new) if new else float("nan")
    mo = sum(old) / len(old) if old else float("nan")
    fp = t.get(("fp16", b, c, "new"), [])
    mf = sum(fp) / len(fp) if fp else float("nan")
    bw = lambda ms: f"{gb[(f, b, c)] / ms / 1e6 / copy_gbps * 100:.0f}%" if copy_gbps and ms == ms else "-"
    print(f"| {f} | {b} | {c} | {mo:.4f} | {mn:.4f} | {mn / mo:.3f} | {mn / mf:.3f} | {bw(mo)} -> {bw(mn)} |")
