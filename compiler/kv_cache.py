"""Decoding state: the KV cache of one conversation and the step function that advances it.

A decoder graph carries its `DecoderInterface` (compiler/ir.py): which inputs take the token ids,
positions and past cache, and which outputs return the logits and the cache one step longer.
`FunctionalDecoder` drives any executable of such a graph by those names; a target with a
preallocated, in-place cache provides its own decoder with the same methods (`length`,
`step(ids) -> logits of the last position`).
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.ir import numpy_dtype
from isthmus.errors import UnsupportedError


def interface(graph):
    """The graph's DecoderInterface; UnsupportedError when its frontend recorded none."""
    if graph.decoder is None:
        raise UnsupportedError(f"graph {graph.name!r} is not a decoder (its frontend recorded no token-ids/"
                               "logits interface); use `isthmus run` for arbitrary graphs")
    return graph.decoder


class KVCache:
    def __init__(self, graph, batch: int = 1):
        d = interface(graph)
        self.names = [n for c in d.kv for n in (c.past_key, c.past_value)]
        self.presents = [n for c in d.kv for n in (c.present_key, c.present_value)]
        batch_dim = d.resolve(graph).input_ids.shape[0]
        self.arrays = {}
        for v in graph.inputs:
            if v.name in self.names:
                shape = [batch if k == batch_dim else 0 if isinstance(k, str) else k for k in v.shape]
                self.arrays[v.name] = np.zeros(shape, np.float32)

    @property
    def length(self) -> int:
        first = next(iter(self.arrays.values()), None)
        return 0 if first is None else first.shape[2]

    def update(self, outputs: dict) -> None:
        for name, present in zip(self.names, self.presents):
            self.arrays[name] = outputs[present]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class FunctionalDecoder:
    """Runs the whole graph per step, feeding the cache in and taking the longer one out.

    A decoder graph without a cache (an interface with no kv layers) is fed every token so far
    on each step, so its logits are those of the whole sequence."""

    def __init__(self, exe):
        self.exe = exe
        self.interface = interface(exe.graph)
        self.cache = KVCache(exe.graph)
        self._tokens: list[int] = []        # the sequence so far, for a graph without a cache
        mask = self.interface.resolve(exe.graph).attention_mask
        self._mask_dtype = None if mask is None else numpy_dtype(mask.dtype)

    @property
    def length(self) -> int:
        return self.cache.length if self.interface.kv else len(self._tokens)

    def step(self, ids: list[int]) -> np.ndarray:
        d = self.interface
        if self.exe.batch_invariant and d.kv and len(ids) > 1:
            # a graph run rounds its rows' products as one block (BLAS): each token alone instead
            for t in ids:
                logits = self.step([t])
            return logits
        if d.kv:
            start, fed = self.cache.length, list(ids)
        else:
            start, fed = 0, self._tokens + list(ids)
        feeds = dict(self.cache.arrays)
        feeds[d.input_ids] = np.asarray([fed], np.int64)
        if d.position_ids is not None:
            feeds[d.position_ids] = np.arange(start, start + len(fed), dtype=np.int64)[None, :]
        if d.attention_mask is not None:      # every position so far, cached and new, is attended to
            feeds[d.attention_mask] = np.ones((1, start + len(fed)), self._mask_dtype)
        out = self.exe.run(feeds)
        self.cache.update(out)
        if not d.kv:
            self._tokens = fed
        return out[d.logits][0, -1]
