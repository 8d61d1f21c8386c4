"""Prefix (conversation) KV reuse: the decoders of finished sequences, kept with the tokens their
KV caches hold, so that a prompt extending an earlier one (the next turn of a conversation, a
client resending its history, a shared system prompt) prefills only what is new.

As vLLM's automatic prefix caching, entries are found by hashes of whole blocks of tokens, each
chained to the one before it (a block's hash stands for the whole prefix up to it), and the match
is then extended token by token and checked against the tokens themselves (a hash collision can
cost a lookup, never a wrong reuse). Keys include the tenant: one tenant's cache is never another's.

A hit that uses (nearly) all of an entry, the next turn of its conversation, takes the decoder
out of the cache (a decoder's in-place KV cache has one owner at a time) and truncates it to the
shared prefix (runtime/tee/kvstate.truncate), at most the prompt's length minus one so that the
prefill yields the last position's logits. A hit on a part of an entry (a system prompt that many
conversations share) copies that part's positions into a fresh decoder and leaves the entry for
the next one: otherwise the first conversation to arrive would consume the shared prefix. Entries leave least recently used
first when the positions they hold pass `budget_bytes`; a decoder that `kvstate` cannot truncate is
never cached.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

from isthmus.runtime.tee import kvstate

BLOCK = 16


@dataclass(eq=False)
class _Entry:
    tenant: str
    tokens: tuple
    decoder: object
    nbytes: int
    keys: tuple                 # (tenant, chained block hash) per whole block


def block_hashes(tokens, block: int = BLOCK) -> list[int]:
    """The chained hash of each whole block of `tokens`."""
    out, h = [], 0
    for i in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[i:i + block])))
        out.append(h)
    return out


def position_bytes(decoder) -> int:
    """The bytes one cached position takes in `decoder` (0: unknown, not cacheable)."""
    n = kvstate.nbytes(decoder)
    if kvstate._in_place(decoder):
        return n // max(1, decoder.capacity)
    return n // decoder.length if decoder.length else 0


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK):
        if budget_bytes < 0 or block < 1:
            raise ValueError("budget_bytes must be >= 0 and block >= 1")
        self.budget, self.block = budget_bytes, block
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()   # LRU first
        self._index: dict[tuple, set[int]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self.used = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tenant: str, tokens, decoder) -> bool:
        """Keep `decoder`, whose KV cache holds exactly `tokens`, for later prompts of `tenant`."""
        tokens = tuple(tokens)
        if not tokens or getattr(decoder, "length", None) != len(tokens):
            return False
        size = position_bytes(decoder) * len(tokens)
        if size <= 0 or size > self.budget or not kvstate.truncate(decoder, len(tokens)):
            return False
        keys = tuple((tenant, h) for h in block_hashes(tokens, self.block))
        with self._lock:
            self._ids += 1
            self._entries[self._ids] = _Entry(tenant, tokens, decoder, size, keys)
            for k in keys:
                self._index.setdefault(k, set()).add(self._ids)
            self.used += size
            while self.used > self.budget:
                self._drop(next(iter(self._entries)))
        return True

    def take(self, tenant: str, prompt, fresh=None) -> tuple[object, int] | None:
        """A decoder of `tenant` holding the longest cached prefix of `prompt` (at most len(prompt)
        - 1 positions), and that length; None on a miss. The cached decoder itself when the prefix
        covers all of its entry but at most a block (the entry leaves the cache), else, given
        `fresh` (a callable making a new empty decoder), a copy of the prefix's positions into it (the entry stays)."""
        prompt = list(prompt)
        with self._lock:
            found = None
            for h in block_hashes(prompt[:len(prompt) - 1], self.block):
                ids = self._index.get((tenant, h))
                if not ids:
                    break
                found = ids
            if found is None:
                self.misses += 1
                return None
            best, best_n = None, 0
            for i in found:
                e = self._entries[i]
                n = _common(e.tokens, prompt, len(prompt) - 1)
                if n > best_n or (n == best_n and best is not None and i > best):
                    best, best_n = i, n
            entry = self._entries[best]
            self.hits += 1
            self.reused_tokens += best_n
            if fresh is None or best_n >= len(entry.tokens) - self.block:
                self._drop(best)
                fresh = None
            else:                     # copied while held: nobody else may take the entry meanwhile
                copy = kvstate.copy_prefix(entry.decoder, best_n, fresh())
                if copy is not None:
                    return copy, best_n
                self._drop(best)
        kvstate.truncate(entry.decoder, best_n)
        return entry.decoder, best_n

    def clear(self) -> None:
        with self._lock:
            for i in list(self._entries):
                self._drop(i)

    def _drop(self, i: int) -> None:
        e = self._entries.pop(i)
        for k in e.keys:
            ids = self._index.get(k)
            if ids is not None:
                ids.discard(i)
                if not ids:
                    del self._index[k]
        self.used -= e.nbytes


def _common(a, b, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
