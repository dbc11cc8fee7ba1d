"""Median attention time per (format, FIELD) of `kvq-gpu bench` JSON lines (each run a line, tagged by
the device scripts with the field they vary: `split` for split_sweep, `context` for b1-steps.sh)."""
import json
import statistics as st
import sys
from collections import defaultdict

path, field = sys.argv[1], sys.argv[2]
ms = defaultdict(list)
for line in open(path):
    r = json.loads(line)
    ms[(r["format"], str(r[field]))].append(r["ms"])
for (f, v), xs in sorted(ms.items()):
    print(f"{f[:40]:40s} {field} {v:>7s}: {1000 * st.median(xs):7.2f} us ({len(xs)} runs)")
