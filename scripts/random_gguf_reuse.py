"""Runs random-llama-gguf.py (../shared/peers, carried in .carry-peers) with each weight shape's random
draws made once and reused for every layer: the same file layout, shapes and per-tensor distribution,
with about 1/32 of the random draws (on one core they are most of the 150-195 s an 8B file took; the
8B write with this wrapper is not yet timed). A decode step's speed does not depend on the weights'
values, and both runtimes read the same bytes.
usage: random_gguf_reuse.py random-llama-gguf.py SRC.gguf OUT.gguf SHAPE [f16|q4_0]"""
import runpy
import sys

import numpy as np

_default_rng = np.random.default_rng


class _Reuse:
    """A Generator whose standard_normal returns one draw per (shape, dtype), the same every call."""

    def __init__(self, seed=None):
        self._g = _default_rng(seed)
        self._drawn = {}

    def standard_normal(self, size=None, dtype=np.float64):
        key = (tuple(np.atleast_1d(size)), np.dtype(dtype).str)
        if key not in self._drawn:
            self._drawn[key] = self._g.standard_normal(size, dtype)
        return self._drawn[key]

    def __getattr__(self, name):
        return getattr(self._g, name)


np.random.default_rng = _Reuse
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
