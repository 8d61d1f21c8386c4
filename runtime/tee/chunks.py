"""AES-256-GCM over a package's chunks, on every core, in one pass over the bytes.

A package's chunks are independent (each has its own nonce, AAD and tag), so they are encrypted and
decrypted in groups of about `GROUP_BYTES` by a pool of `os.cpu_count()` threads: the `cryptography`
package's `AESGCM.encrypt_into` / `decrypt_into` release the GIL and write straight into the
destination. Sealing reads the payload and writes the package on the calling thread, in order,
while the pool encrypts the groups ahead of it (a bounded number in flight); unsealing reads each
group with `pread` on the worker that decrypts it, into that worker's own buffer, and decrypts into
the caller's destination (the enclave's anonymous mapping).

Nothing here hashes the bytes: the Merkle tree of a package is built from the chunk tags
(`leaf`), which GCM has already computed over every byte (docs/security.md says why that is
enough). A group that fails to authenticate reports its first bad chunk; the caller reports the
lowest failing index of all, as a sequential pass would.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isthmus.runtime.tee.crypto import TAG_BYTES, zeroise

GROUP_BYTES = 4 << 20          # plaintext bytes per task: large enough that the pool's overhead vanishes
READ_BYTES = 512 << 10         # ciphertext read at once when unsealing: small enough to stay in cache
IN_FLIGHT_BYTES = 128 << 20    # sealing: at most about this much input and output held at once
KEEP_BYTES = 64 << 20          # sealing: buffers kept for the next seal


POOL_NAME = "isthmus-gcm"     # its threads' name prefix (crypto.zeroise wipes inline on them)
_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process's cipher threads, one per core (shared by every seal and unseal). Keyed by process
    id: a child forked after the pool started has none of its threads, and gets its own pool."""
    pid = os.getpid()
    with _pool_lock:
        if pid not in _pools:
            _pools.clear()
            _pools[pid] = ThreadPoolExecutor(workers(), thread_name_prefix=POOL_NAME)
        return _pools[pid]


def workers() -> int:
    return max(1, os.cpu_count() or 1)


def nonce(prefix: bytes, i: int) -> bytes:
    return prefix + i.to_bytes(4, "big")


def aad(binding: bytes, i: int, final: bool) -> bytes:
    return binding + i.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def leaf(i: int, tag) -> bytes:
    """The Merkle leaf of chunk i: its position and its GCM tag."""
    return hashlib.sha256(b"\x00" + i.to_bytes(4, "big") + bytes(tag)).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    level = list(leaves) or [hashlib.sha256(b"").digest()]
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[j] + level[j + 1]).digest() for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Plan:
    """The chunking of one package: sizes, nonce prefix, header binding, and the groups of chunks."""

    def __init__(self, header, binding: bytes):
        self.size, self.count, self.total = header.chunk_size, header.chunk_count, header.payload_size
        self.prefix, self.binding = header.nonce_prefix, binding
        self.per_group = max(1, GROUP_BYTES // self.size)

    def length(self, i: int) -> int:
        return min(self.size, self.total - i * self.size)

    def groups(self):
        """(first chunk, end chunk, plaintext offset, plaintext bytes) of each group, in order."""
        for first in range(0, self.count, self.per_group):
            end = min(self.count, first + self.per_group)
            start = first * self.size
            yield first, end, start, min(self.total, end * self.size) - start

    def sealed_bytes(self, first: int, end: int) -> int:
        return min(self.total, end * self.size) - first * self.size + TAG_BYTES * (end - first)

    def params(self, i: int) -> tuple[bytes, bytes]:
        return nonce(self.prefix, i), aad(self.binding, i, i == self.count - 1)


# -- sealing -------------------------------------------------------------------------------------

def encrypt(plan: Plan, dek, read: Callable, write: Callable | None = None, *, fd: int | None = None,
            at: int = 0, progress=lambda done: None) -> list[bytes]:
    """Encrypt the payload group by group. `read(n, scratch)` returns the next n plaintext bytes (a
    view, possibly of `scratch`). The ciphertext (chunk, tag, chunk, tag...) goes either to
    `write(view)`, in order on this thread, or, given a file descriptor `fd`, to the file at offset
    `at` onwards, each worker writing its own group with `pwrite` (filesystems take concurrent
    writes to a preallocated file faster than one stream). Returns the chunk tags in order."""
    aes = AESGCM(bytes(dek))
    group = plan.per_group * (plan.size + TAG_BYTES)
    depth = max(2, min(2 * workers(), IN_FLIGHT_BYTES // (2 * group)))
    free_in = [_buffers.take(plan.per_group * plan.size) for _ in range(depth)]
    free_out = [_buffers.take(plan.per_group * (plan.size + TAG_BYTES)) for _ in range(depth)]
    used_in: set[int] = set()
    pending: deque = deque()
    tags: list[bytes] = []

    file_at = at

    def task(first: int, end: int, src: memoryview, out: memoryview) -> list[bytes]:
        got, at, pos = [], 0, 0
        for i in range(first, end):
            n = plan.length(i)
            iv, ad = plan.params(i)
            aes.encrypt_into(iv, src[pos:pos + n], ad, out[at:at + n + TAG_BYTES])
            got.append(bytes(out[at + n:at + n + TAG_BYTES]))
            pos, at = pos + n, at + n + TAG_BYTES
        if fd is not None:
            pwrite_all(fd, out[:at], file_at + first * (plan.size + TAG_BYTES))
        return got

    def drain_one() -> None:
        future, scratch, out, nbytes, end = pending[0]
        tags.extend(future.result())
        if fd is None:
            write(memoryview(out)[:nbytes])
        pending.popleft()
        free_in.append(scratch)
        free_out.append(out)
        progress(end * plan.size)

    try:
        for first, end, _, n in plan.groups():
            if len(pending) >= depth:
                drain_one()
            scratch, out = free_in[-1], free_out[-1]
            src = read(n, memoryview(scratch))
            if src.obj is scratch:
                used_in.add(id(scratch))
            if len(src) != n:
                raise EOFError(n - len(src))
            free_in.pop()
            free_out.pop()
            pending.append((pool().submit(task, first, end, src, memoryview(out)), scratch, out,
                            plan.sealed_bytes(first, end), end))
        while pending:
            drain_one()
    finally:                       # on failure too: no worker may still use a buffer, plaintext is wiped
        for future, *_ in pending:
            future.cancel()
        for future, scratch, out, *_ in pending:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:
                    pass
            free_in.append(scratch)
            free_out.append(out)
        for scratch in free_in:
            if id(scratch) in used_in:
                zeroise(scratch)   # plaintext copied from payload sections that were not contiguous
            _buffers.give(scratch)
        for out in free_out:
            _buffers.give(out)
    return tags


class _Buffers:
    """Buffers kept from one seal to the next: fresh memory costs a page fault per 4 KiB, which at
    these sizes is slower than the cipher. They hold ciphertext, or plaintext zeroised before return."""

    def __init__(self, keep_bytes: int):
        self._free: list[bytearray] = []
        self._lock, self._keep = threading.Lock(), keep_bytes

    def take(self, n: int) -> bytearray:
        with self._lock:
            for k, b in enumerate(self._free):
                if len(b) == n:
                    return self._free.pop(k)
        return bytearray(n)

    def give(self, b: bytearray) -> None:
        with self._lock:
            self._free.append(b)
            while sum(map(len, self._free)) > self._keep:
                self._free.pop(0)


_buffers = _Buffers(KEEP_BYTES)


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# -- unsealing -----------------------------------------------------------------------------------

_local = threading.local()


def _scratch(n: int) -> memoryview:
    """This worker's read buffer (ciphertext only), grown as needed and kept for the next call."""
    if n > 8 << 20:                    # chunks of more than a few MB: not worth keeping per thread
        return memoryview(bytearray(n))
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(n)
    return memoryview(buf)[:n]


class Decryption:
    """Every chunk decrypted into `dest` (the payload's size), group by group in order of position,
    started at construction and waited for by offset: `ready(end)` returns once every chunk before
    byte `end` has authenticated, so a reader can parse the first bytes while the rest are still
    being decrypted. `read(pos, n, scratch)` returns n package bytes at pos, thread-safely.
    `threads`: how many of the pool's threads take groups (all by default; a caller that parses
    meanwhile leaves its own core free, or the three threads share two cores).

    Only authenticated plaintext is ever reported ready: a chunk's bytes count once `decrypt_into`
    has verified its tag (a chunk that fails may have left unauthenticated bytes in `dest`, which
    the caller zeroises after `stop`)."""

    def __init__(self, plan: Plan, dek, data_offset: int, read: Callable, dest: memoryview,
                 progress=lambda done: None, threads: int | None = None):
        aes = AESGCM(bytes(dek))
        self._progress, self._total = progress, plan.total
        self._groups = list(plan.groups())
        if self._groups:             # the first group chunk by chunk: a parser's first bytes come soonest
            first, end, _, _ = self._groups[0]
            self._groups[:1] = [(i, i + 1, i * plan.size, plan.length(i)) for i in range(first, end)]
        self._results: list = [None] * len(self._groups)   # (tags, first bad chunk) or an exception
        self._next, self._stopped = 0, False
        self._changed = threading.Condition()

        def decrypt_group(first: int, end: int, start: int) -> tuple[list[bytes], int | None]:
            # read a few chunks at a time, so the ciphertext is still in cache when it is decrypted
            got, pos, out, i = [], data_offset + start + TAG_BYTES * first, start, first
            while i < end:
                stop = min(end, i + max(1, READ_BYTES // plan.size))
                m = plan.sealed_bytes(i, stop)
                data, at = read(pos, m, _scratch(m)), 0
                for j in range(i, stop):
                    n = plan.length(j)
                    iv, ad = plan.params(j)
                    try:
                        aes.decrypt_into(iv, data[at:at + n + TAG_BYTES], ad, dest[out:out + n])
                    except InvalidTag:
                        return got, j
                    got.append(bytes(data[at + n:at + n + TAG_BYTES]))
                    at, out = at + n + TAG_BYTES, out + n
                pos, i = pos + m, stop
            return got, None

        def runner() -> None:
            while True:
                with self._changed:
                    if self._stopped or self._next == len(self._groups):
                        return
                    g, self._next = self._next, self._next + 1
                first, end, start, _ = self._groups[g]
                try:
                    result = decrypt_group(first, end, start)
                except BaseException as e:          # a short read: reported to whoever waits for g
                    result = e
                with self._changed:
                    self._results[g] = result
                    self.ended = time.perf_counter()
                    if isinstance(result, BaseException) or result[1] is not None:
                        self._stopped = True        # nothing after a failure is needed
                    self._changed.notify_all()

        self.tags: list[bytes] = []
        self.done = 0                 # plaintext bytes before this offset have authenticated
        self.bad: int | None = None   # the first chunk that did not authenticate
        self._waited = 0              # groups whose results `ready` has taken, in order
        self.started = self.ended = time.perf_counter()   # ended: when the last group so far ended
        count = min(len(self._groups), threads or workers())
        self._runners = [pool().submit(runner) for _ in range(count)]

    def ready(self, end: int) -> int:
        """Wait until every chunk before byte `end` has been decrypted and authenticated (or the
        first one that did not is known: `bad`). Returns the bytes ready from the start. Read errors
        (a SealError for a short file) propagate, after the other groups have stopped."""
        while self._waited < len(self._groups) and self.done < end and self.bad is None:
            g = self._waited
            with self._changed:
                while self._results[g] is None:
                    self._changed.wait()
                result = self._results[g]
            if isinstance(result, BaseException):
                self.stop()
                raise result
            got, failed = result
            self._waited += 1
            self.tags.extend(got)
            if failed is not None:
                self.bad = failed
                self.stop()
                break
            self.done = self._groups[g][2] + self._groups[g][3]
            self._progress(self.done)
        return self.done

    def finish(self) -> tuple[list[bytes], int | None]:
        """Wait for every chunk: the tags in order and the first chunk that did not authenticate."""
        self.ready(self._total)
        return self.tags, self.bad

    def stop(self) -> None:
        """Stop taking groups and wait for those begun: no worker writes into `dest` after this."""
        with self._changed:
            self._stopped = True
        for runner in self._runners:
            runner.result()
