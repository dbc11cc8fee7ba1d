"""Joins kvq-gpu bench and sdpa_bench JSON lines (one run) into a Markdown table of ratios."""
import json, sys
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
pts = {}
for r in rows:
    if "ms" in r:
        pts[(r["format"], r["batch"], r["context"])] = r
fmts = sorted({r["format"] for r in rows if "ms" in r}, key=lambda f: (not f.startswith("sdpa"), f != "fp16", f))
print("| format | B | T | ms | GB/s | vs kvq fp16 | vs best SDPA |")
print("|---|---|---|---|---|---|---|")
for (f, b, t), r in sorted(pts.items(), key=lambda x: (x[0][1], x[0][2], fmts.index(x[0][0]))):
    fp = pts.get(("fp16", b, t))
    sd = [pts[k]["ms"] for k in (("sdpa-flash", b, t), ("sdpa-cudnn", b, t)) if k in pts]
    vs_fp = f"{fp['ms'] / r['ms']:.2f}x" if fp else "-"
    vs_sd = f"{min(sd) / r['ms']:.2f}x" if sd else "-"
    print(f"| {f} | {b} | {t} | {r['ms']:.3f} | {r['gbps']:.0f} | {vs_fp} | {vs_sd} |")
