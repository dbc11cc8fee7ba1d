#!/usr/bin/env python3
"""Per-layer KLT budgets from the calibrated distortions alone (no probes): reverse water-filling across
layers. Each layer's key (or value) heads share one code budget per token (the codec gives every head
the same block size), so the unit is a layer's bits per head-token; D_l(n) = sum over the layer's heads
of the distortion left after the codec's own greedy allocation of n bits (transform.rs `allocate`).
Greedy over layers: each next step of STEP bits goes where it lowers sum_l D_l most, until the mean
over layers is the target. The calibrated distortions are in the weighted space (keys: squared score
error; values: what W_o passes on), so they are comparable across layers to first order.

usage: global_alloc.py FILE STREAM(k|v) BITS OUT.json [OTHER_SPEC] [SINK] [STEP] [FLOOR_BITS]
  writes a plan: STREAM of every layer `klt:bits=b_l,sink=SINK,file=FILE`, the other stream OTHER_SPEC.
"""
import json
import struct
import sys


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    meta = head.pop("__metadata__", {})
    out = {}
    for k, v in head.items():
        a, b = v["data_offsets"]
        assert v["dtype"] == "F32"
        out[k] = (v["shape"], struct.unpack(f"<{(b - a) // 4}f", data[a:b]))
    return meta, out


def allocate(dist, d, bmax, total):
    """transform.rs `allocate`: each next bit to the component whose distortion it lowers most."""
    b = [0] * d
    gain = lambda i: dist[i * (bmax + 1) + b[i]] - dist[i * (bmax + 1) + b[i] + 1]
    for _ in range(min(total, d * bmax)):
        best, bi = None, -1
        for i in range(d):
            if b[i] < bmax:
                g = gain(i)
                if best is None or g > best:  # first maximum wins, as max_by(...).then(j.cmp(i))
                    best, bi = g, i
        if bi < 0:
            break
        b[bi] += 1
    return b


def left(dist, d, bmax, total):
    b = allocate(dist, d, bmax, total)
    return sum(dist[i * (bmax + 1) + b[i]] for i in range(d))


def main():
    path, stream, bits, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    other = sys.argv[5] if len(sys.argv) > 5 else "fp16"
    sink = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    step = int(sys.argv[7]) if len(sys.argv) > 7 else 4
    meta, t = load(path)
    d, bmax, heads = int(meta["head_dim"]), int(meta["bmax"]), int(meta["heads"])
    layers = sorted({int(k.split(".")[1]) for k in t})
    per = {}
    for l in layers:
        shape, flat = t[f"layer.{l}.{stream}.dist"]
        n = d * (bmax + 1)
        per[l] = [flat[h * n:(h + 1) * n] for h in range(heads)]
    cache = {}

    def D(l, n):
        if (l, n) not in cache:
            cache[(l, n)] = sum(left(x, d, bmax, n) for x in per[l])
        return cache[(l, n)]

    target = round(bits * d) * len(layers)
    floor = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    lo = max(step, round(floor * d), 16 if meta.get(f"{'key' if stream == 'k' else 'value'}_scale") == "on" else step)
    n = {l: lo for l in layers}
    while sum(n.values()) + step <= target:
        best = max(layers, key=lambda l: (D(l, n[l]) - D(l, n[l] + step)) if n[l] + step <= d * bmax else -1)
        n[best] += step
    plan = {"default": other, "layers": {}}
    for l in layers:
        spec = f"klt:bits={n[l] / d},window=0,sink={sink},file={path}"
        plan["layers"][str(l)] = {stream: spec, ("v" if stream == "k" else "k"): other}
    with open(out, "w") as f:
        json.dump(plan, f, indent=2)
    print(" ".join(f"{n[l] / d:g}" for l in layers), file=sys.stderr)
    print(f"mean {sum(n.values()) / len(layers) / d:.4f} bits; left {sum(D(l, n[l]) for l in layers):.4g} "
          f"vs uniform {sum(D(l, round(bits * d)) for l in layers):.4g}", file=sys.stderr)


if __name__ == "__main__":
    main()
