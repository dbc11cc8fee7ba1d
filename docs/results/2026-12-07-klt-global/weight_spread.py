# AM/GM of the eigenvalues of W = F^T F per layer, stream and KV head of a KLT calibration file (F: the
# forward transform V^T W^(1/2)), i.e. what a weighted transform in front of a uniform quantizer could gain
# (0.5 log2 AM/GM bits). Pure Python (log-determinant by LU). Run from the repository root.
import json, struct, math, sys
sys.path.insert(0, "docs/results/2026-12-07-klt-global")
from global_alloc import load
meta, t = load('data/klt-lcet10-gv.safetensors')
d=64; H=3
def logdet(M):
    n=len(M); A=[row[:] for row in M]; ld=0.0
    for i in range(n):
        p=max(range(i,n), key=lambda r: abs(A[r][i])); A[i],A[p]=A[p],A[i]
        piv=A[i][i]; ld+=math.log(abs(piv))
        for r in range(i+1,n):
            f=A[r][i]/piv
            if f:
                Ar=A[r]; Ai=A[i]
                for c in range(i,n): Ar[c]-=f*Ai[c]
    return ld
res={'k':[], 'v':[]}
for l in range(30):
    for s in 'kv':
        shape, flat = t[f'layer.{l}.{s}.fwd']
        for h in range(H):
            F=[list(flat[h*d*d + r*d:(h)*d*d+(r+1)*d]) for r in range(d)]
            fro=sum(x*x for row in F for x in row)
            ld=logdet(F)
            am=fro/d; gm=math.exp(2*ld/d)
            res[s].append(am/gm)
for s in 'kv':
    r=res[s]; bits=[0.5*math.log2(x) for x in r]
    print(s, 'AM/GM median %.2f min %.2f max %.2f -> bits equiv median %.2f' % (sorted(r)[len(r)//2], min(r), max(r), sorted(bits)[len(bits)//2]))
