"""PyTorch SDPA decode-attention baseline (flash and cuDNN backends), same shapes as `kvq-gpu bench`.
Prints JSON lines: one query token, 32 query / 8 KV heads, d=128, f16, CUDA-event medians."""
import json, sys, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

def bench(backend, b, t, hq=32, hkv=8, d=128, reps=50):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
    with sdpa_kernel([backend]):
        for _ in range(5):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2], 2 * b * hkv * t * d * 2

# --copy-only: just the device copy bandwidth below (the denominator of "% of copy BW").
points = [] if "--copy-only" in sys.argv[1:] else [(b, t) for b in (1, 8) for t in (4096, 16384, 65536, 131072)]
for b, t in points:
    for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            ms, by = bench(be, b, t)
            print(json.dumps({"format": name, "batch": b, "context": t, "ms": round(ms, 4), "bytes": by, "gbps": round(by / ms / 1e6, 1)}), flush=True)
        except Exception as ex:  # a backend that refuses the shape is reported, not hidden
            print(json.dumps({"format": name, "batch": b, "context": t, "error": str(ex)[:200]}), flush=True)

# The bandwidth wall in the same run: device-to-device copy of 2 GiB (read + write bytes / time).
x = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    y.copy_(x)
    e.record()
    e.synchronize()
    times.append(s.elapsed_time(e))
times.sort()
ms = times[len(times) // 2]
print(json.dumps({"copy_gbps": round(2 * x.numel() * 2 / ms / 1e6, 1), "copy_ms": round(ms, 4)}), flush=True)
