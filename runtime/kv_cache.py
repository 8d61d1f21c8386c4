"""The KV cache a decoder graph reads as `past_*` inputs and returns, one step longer, as `present_*`."""

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

    def feeds(self) -> dict:
        return dict(self.arrays)

    def update(self, outputs: dict) -> None:
        for name in self.names:
            self.arrays[name] = outputs["present" + name[len("past"):]]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())
