"""Joins kvq-gpu bench and sdpa_bench JSON lines (one run) into a Markdown table of ratios: time vs kvq
fp16 and vs the faster SDPA backend, compression ratio (fp16 bytes / format bytes read), and the
fraction of the device-copy bandwidth measured in the same run that each row's own bytes reach."""
import json, sys
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
copy = next((r["copy_gbps"] for r in rows if "copy_gbps" in r), None)
pts = {}
for r in rows:
    if "ms" in r:
        pts[(r["format"], r["batch"], r["context"])] = r
fmts = sorted({r["format"] for r in rows if "ms" in r}, key=lambda f: (not f.startswith("sdpa"), f != "fp16", f))
if copy:
    print(f"Device copy bandwidth in this run: {copy:.0f} GB/s (read + write).\n")
print("| format | B | T | ms | GB/s | % of copy BW | compression | vs kvq fp16 | vs best SDPA |")
print("|---|---|---|---|---|---|---|---|---|")
for (f, b, t), r in sorted(pts.items(), key=lambda x: (x[0][1], x[0][2], fmts.index(x[0][0]))):
    fp = pts.get(("fp16", b, t))
    sd = [pts[k]["ms"] for k in (("sdpa-flash", b, t), ("sdpa-cudnn", b, t)) if k in pts]
    vs_fp = f"{fp['ms'] / r['ms']:.2f}x" if fp else "-"
    vs_sd = f"{min(sd) / r['ms']:.2f}x" if sd else "-"
    comp = f"{fp['bytes'] / r['bytes']:.2f}x" if fp and not f.startswith("sdpa") else "-"
    frac = f"{100 * r['gbps'] / copy:.0f}%" if copy else "-"
    print(f"| {f} | {b} | {t} | {r['ms']:.3f} | {r['gbps']:.0f} | {frac} | {comp} | {vs_fp} | {vs_sd} |")
