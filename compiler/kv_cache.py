"""Decoding state: the KV cache of one conversation and the step function that advances it.

A decoder graph reads its cache as `past_*` inputs and returns it, one step longer, as
`present_*` outputs. `FunctionalDecoder` drives any executable that follows that interface;
a target with a preallocated, in-place cache provides its own decoder with the same methods
(`length`, `step(ids) -> logits of the last position`).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, graph, batch: int = 1):
        self.names = [v.name for v in graph.inputs if v.name.startswith(("past_key", "past_value"))]
        self.arrays = {}
        for v in graph.inputs:
            if v.name in self.names:
                shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in v.shape]
                self.arrays[v.name] = np.zeros(shape, np.float32)

    @property
    def length(self) -> int:
        first = next(iter(self.arrays.values()), None)
        return 0 if first is None else first.shape[2]

    def update(self, outputs: dict) -> None:
        for name in self.names:
            self.arrays[name] = outputs["present" + name[len("past"):]]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class FunctionalDecoder:
    """Runs the whole graph per step, feeding the cache in and taking the longer one out."""

    def __init__(self, exe):
        self.exe = exe
        self.cache = KVCache(exe.graph)

    @property
    def length(self) -> int:
        return self.cache.length

    def step(self, ids: list[int]) -> np.ndarray:
        start = self.cache.length
        feeds = dict(self.cache.arrays)
        feeds["input_ids"] = np.asarray([ids], np.int64)
        feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None, :]
        out = self.exe.run(feeds)
        self.cache.update(out)
        return out["logits"][0, -1]
