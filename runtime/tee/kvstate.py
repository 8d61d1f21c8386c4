"""A decoder's KV cache as plain arrays, and back: what a conversation seals when it is evicted.

Two decoder kinds are understood: `FunctionalDecoder` (the cache is a dict of growing arrays) and
decoders with a preallocated in-place cache (`caches` {step: (K, V)} of `capacity` positions and
a `length`, as the Numba target's). For any other decoder `export` returns None and the caller
falls back to prefilling the conversation's tokens again after a restore.
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.kv_cache import FunctionalDecoder


def _in_place(decoder) -> bool:
    return isinstance(getattr(decoder, "caches", None), dict) and hasattr(decoder, "capacity")


def export(decoder) -> list[np.ndarray] | None:
    """The cached positions as arrays [batch, kv_heads, length, head_dim] (views, no copy), or None."""
    if isinstance(decoder, FunctionalDecoder):
        return [decoder.cache.arrays[n] for n in decoder.cache.names]
    if _in_place(decoder):
        n = decoder.length
        return [a[:, :, :n] for pair in decoder.caches.values() for a in pair]
    return None


def restore(exe, arrays: list[np.ndarray]):
    """A fresh decoder of `exe` holding `arrays` (as `export` gave them), or None if it cannot."""
    return _fill(exe.decoder(), arrays)


def copy_prefix(decoder, n: int, fresh):
    """`fresh` (a new decoder of the same executable) holding a copy of `decoder`'s first `n`
    positions, or None if these decoders cannot."""
    arrays = export(decoder)
    if not arrays or n > decoder.length:
        return None
    return _fill(fresh, [a[:, :, :n] for a in arrays], copy=True)


def _fill(decoder, arrays: list[np.ndarray], copy: bool = False):
    """`decoder` (new, empty) holding `arrays` as its cached positions (copies when `copy`; an
    in-place cache always copies into its own buffers), or None if its cache is not of that shape."""
    if isinstance(decoder, FunctionalDecoder):
        names = decoder.cache.names
        if len(arrays) != len(names) or any(a.shape[:2] + a.shape[3:] != decoder.cache.arrays[n].shape[:2]
                                            + decoder.cache.arrays[n].shape[3:] for n, a in zip(names, arrays)):
            return None
        decoder.cache.arrays = {k: a.copy() if copy else a for k, a in zip(names, arrays)}
        return decoder
    if _in_place(decoder):
        targets = [a for pair in decoder.caches.values() for a in pair]
        n = arrays[0].shape[2] if arrays else 0
        if len(arrays) != len(targets) or n > decoder.capacity:
            return None
        for dst, src in zip(targets, arrays):
            dst[:, :, :n] = src
        decoder.length = n
        return decoder
    return None


def truncate(decoder, n: int) -> bool:
    """Keep the first `n` cached positions; False if this decoder cannot."""
    if n > decoder.length:
        return False
    if isinstance(decoder, FunctionalDecoder):
        c = decoder.cache
        c.arrays = {k: a[:, :, :n] for k, a in c.arrays.items()}
        return True
    if _in_place(decoder):
        decoder.length = n
        return True
    return n == decoder.length


def nbytes(decoder) -> int:
    """Memory the decoder's cache holds (an in-place cache counts its whole capacity)."""
    if isinstance(decoder, FunctionalDecoder):
        return decoder.cache.nbytes()
    if _in_place(decoder):
        return sum(a.nbytes for pair in decoder.caches.values() for a in pair)
    return 0


def wipe(decoder) -> None:
    """Zero the decoder's cache buffers (best effort: earlier copies may survive elsewhere)."""
    if isinstance(decoder, FunctionalDecoder):
        arrays = list(decoder.cache.arrays.values())
    elif _in_place(decoder):
        arrays = [a for pair in decoder.caches.values() for a in pair]
    else:
        return
    for a in arrays:
        base = a if a.base is None else a.base
        if isinstance(base, np.ndarray) and base.flags.writeable:
            base.fill(0)
        elif a.flags.writeable:
            a.fill(0)
