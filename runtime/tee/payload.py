"""The plaintext inside a sealed package: named sections behind a small table.

    u32 table length | table (canonical JSON: {"format": 1, "sections": [{name, offset, size}, ...]})
    | zero padding | section | zero padding | section ...

Every section starts at a multiple of 64 bytes, so tensors parsed in place from the unsealed buffer
keep the alignment their file gave them. A sealed model carries

    model.json      the manifest: {"format": "gguf" | "onnx" | "safetensors", "entry": the file the
                    frontend opens ("." for a checkpoint folder), "name": the file or folder's name}
    model/<name>    each of the model's files, named relative to its folder (a GGUF file; an ONNX
                    file and its external data; a checkpoint's config, shards and tokenizer files)
    program.ir      the compiled program: the IR text after the pass pipeline

(packages sealed before the manifest carry the GGUF file as `model.gguf`, which still opens).
`PayloadReader` streams the payload from the source files without building it in memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

from isthmus.errors import SealError
from isthmus.runtime.tee.crypto import canonical

ALIGN = 64
MANIFEST, FILE_PREFIX, PROGRAM, LEGACY_GGUF = "model.json", "model/", "program.ir", "model.gguf"
FORMATS = ("gguf", "onnx", "safetensors")
_U32 = struct.Struct("<I")


def _pad(n: int) -> int:
    return -n % ALIGN


def _size(source) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    return os.stat(source).st_size


def layout(parts: list[tuple[str, int]]) -> tuple[bytes, list[tuple[str, int, int]], int]:
    """The table and (name, offset, size) of each section for sections of the given sizes."""
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"section names repeat: {names}")
    # The table's length depends on the offsets, which depend on its length: iterate to a fixed point.
    table_len = 0
    while True:
        offset = _U32.size + table_len
        offset += _pad(offset)
        placed = []
        for name, size in parts:
            placed.append((name, offset, size))
            offset += size + _pad(size)
        table = canonical({"format": 1, "sections": [{"name": n, "offset": o, "size": s} for n, o, s in placed]})
        if len(table) == table_len:
            return table, placed, placed[-1][1] + placed[-1][2] if placed else _U32.size + table_len
        table_len = len(table)


class PayloadReader(io.RawIOBase):
    """A read-only stream of the payload for `parts` [(name, path or bytes)]; files are memory-mapped
    and read lazily. `readview(n, scratch)` hands out the next n bytes without a copy when they lie
    inside one section (sealing encrypts straight from the mapped model file)."""

    def __init__(self, parts: list[tuple[str, object]]):
        table, placed, self.size = layout([(name, _size(src)) for name, src in parts])
        self._pieces: list[object] = [_U32.pack(len(table)) + table]
        end = len(self._pieces[0])
        for (_, offset, size), (_, src) in zip(placed, parts):
            self._pieces += [bytes(offset - end), src]
            end = offset + size
        self._index, self._pos, self._view = 0, 0, None

    def readable(self) -> bool:
        return True

    def _current(self) -> memoryview | None:
        while self._index < len(self._pieces):
            if self._view is None:
                piece = self._pieces[self._index]
                if isinstance(piece, (bytes, bytearray, memoryview)):
                    self._view = memoryview(piece).cast("B")
                else:
                    self._view = _map_file(piece)
            if self._pos < len(self._view):
                return self._view
            self._view, self._index, self._pos = None, self._index + 1, 0
        return None

    def readinto(self, buf) -> int:
        out = memoryview(buf).cast("B")
        view = self._current()
        if view is None:
            return 0
        n = min(len(out), len(view) - self._pos)
        out[:n] = view[self._pos:self._pos + n]
        self._pos += n
        return n

    def readview(self, n: int, scratch: memoryview) -> memoryview:
        """The next `n` bytes: a view into the source when they are contiguous, else copied into `scratch`."""
        view = self._current()
        if view is not None and len(view) - self._pos >= n:
            self._pos += n
            return view[self._pos - n:self._pos]
        got = 0
        while got < n:
            k = self.readinto(scratch[got:n])
            if not k:
                break
            got += k
        return scratch[:got]


def _map_file(path) -> memoryview:
    """The file mapped read-only; its page tables populated up front where the OS allows (the cipher
    threads then read it without a page fault per 4 KiB, which would cost more than the cipher)."""
    import mmap
    with open(Path(path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        populate = getattr(mmap, "MAP_POPULATE", 0)
        if populate:
            try:
                return memoryview(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ))
            except OSError:
                pass
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def sections(buf) -> dict[str, memoryview]:
    """The named sections of an unsealed payload, as read-only views of `buf` (no copies)."""
    return views(buf, spans(buf))


def views(buf, placed: dict[str, tuple[int, int]]) -> dict[str, memoryview]:
    """Read-only views of `buf` at the (offset, size) of each section named in `placed`."""
    view = memoryview(buf).cast("B").toreadonly()
    return {name: view[offset:offset + size] for name, (offset, size) in placed.items()}


def spans(buf, ready=None) -> dict[str, tuple[int, int]]:
    """Each section's (offset, size) in an unsealed payload, from its table. `ready(end)`, when
    given, is called before the table's bytes are read: they may still be being decrypted."""
    view = memoryview(buf).cast("B")
    try:
        if ready is not None:
            ready(_U32.size)
        (n,) = _U32.unpack_from(view, 0)
        if n > len(view) - _U32.size:
            raise ValueError("table runs past the end")
        if ready is not None:
            ready(_U32.size + n)
        table = json.loads(str(view[_U32.size:_U32.size + n], "utf-8"))
        if table.get("format") != 1:
            raise ValueError(f"unknown payload format {table.get('format')!r}")
        out = {}
        for s in table["sections"]:
            name, offset, size = s["name"], s["offset"], s["size"]
            if not (isinstance(name, str) and type(offset) is int and type(size) is int
                    and 0 <= offset <= offset + size <= len(view)) or name in out:
                raise ValueError(f"bad section entry {s!r}")
            out[name] = (offset, size)
        return out
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, RecursionError) as e:
        raise SealError(f"the unsealed payload's section table is malformed ({e})") from None


def model_parts(parts: dict[str, memoryview], name: str) -> tuple[dict, dict[str, memoryview]]:
    """The manifest and the model's files (name -> view) among a payload's sections; SealError when
    the payload holds no model or a malformed manifest."""
    if MANIFEST not in parts:
        if LEGACY_GGUF in parts:
            return {"format": "gguf", "entry": LEGACY_GGUF, "name": name}, {LEGACY_GGUF: parts[LEGACY_GGUF]}
        raise SealError(f"{name}: the payload lacks a model ({MANIFEST} or {LEGACY_GGUF})")
    try:
        manifest = json.loads(str(parts[MANIFEST], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") in FORMATS
            and all(isinstance(manifest.get(k), str) and manifest[k] for k in ("entry", "name"))):
        raise SealError(f"{name}: the payload's {MANIFEST} is malformed")
    files = {k[len(FILE_PREFIX):]: v for k, v in parts.items() if k.startswith(FILE_PREFIX)}
    return manifest, files
