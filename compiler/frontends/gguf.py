"""GGUF reader, written from the format spec (ggml/docs/gguf.md); it imports no GGUF library.

A GGUF file is: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
(key string, u32 value type, value), the tensor index (name, u32 n_dims, u64 dims with the
fastest-varying first, u32 ggml type, u64 offset), padding to the alignment, then the tensor data.
Strings are a u64 byte length then UTF-8 bytes; everything is little-endian.

The file is memory-mapped read-only and tensors are views into it, so opening a model costs the
time to parse its index, not to read its weights. An in-memory buffer (bytes, bytearray,
memoryview) is read the same way, through a read-only view: a sealed model is unsealed into
enclave memory and parsed there, so its plaintext never touches disk. The file is untrusted
input: every length and count is checked against what is left of the file before it is used,
and any malformation ends in a one-line `ModelFormatError` naming the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from isthmus.compiler.quant import GGML_TYPES, PLAIN_DTYPES, SUPPORTED, QuantizedArray, check_supported
from isthmus.compiler.frontends.files import map_readonly, one_line
from isthmus.errors import ModelFormatError, UnsupportedError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 used 32-bit lengths and predates every model worth running
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: real files use none, so this only stops runaway recursion

# GGUF value type -> struct format of one scalar; 7 is bool, 8 string, 9 array.
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRUCTS = {t: struct.Struct("<" + c) for t, c in _FORMATS.items()}
# Bool arrays are read as bytes: numpy's bool dtype would keep values other than 0 and 1 as-is.
_SCALARS = {t: np.dtype("u1" if c == "?" else "<" + c) for t, c in _FORMATS.items()}
BOOL, STRING, ARRAY = 7, 8, 9
_MIN_SIZE = {**{t: dt.itemsize for t, dt in _SCALARS.items()}, STRING: 8, ARRAY: 12}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(eq=False)
class GGUFFile:
    """A parsed GGUF file. `tensors` maps names to numpy arrays (F32, F16) or `QuantizedArray`s,
    all read-only views of the mapped file, in numpy dimension order (slowest first)."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray | QuantizedArray]
    tensor_types: dict[str, str]  # tensor name -> ggml type name, e.g. "Q4_1"
    alignment: int
    data_offset: int  # where the tensor data section starts
    _mmap: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read_gguf(source, name: str | None = None, ready: Callable[[int], int] | None = None) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor index, and map its tensors without reading them.

    `source` is a path (memory-mapped) or a buffer (bytes, bytearray, memoryview; the tensors are
    then read-only views of it). `name` labels errors: by default the path, or "<buffer>".
    `ready(end)`, for a buffer still being filled (a sealed model being decrypted), waits until its
    first `end` bytes are in place and returns how many are: the parser asks before it reads."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<buffer>"
        mm = _view(source, name)
    else:
        name = name or os.fspath(source)
        mm = map_readonly(os.fspath(source), "GGUF")
    try:
        return _Parser(mm, name, ready).parse()
    except (ModelFormatError, UnsupportedError):
        raise
    except (struct.error, IndexError, KeyError, UnicodeDecodeError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        # The checks below should leave nothing for this to catch; it keeps the promise anyway.
        raise ModelFormatError(f"{name}: corrupt GGUF file ({type(e).__name__}: {one_line(str(e))})") from None


def _view(buf, name: str) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        if not view.c_contiguous:
            raise ModelFormatError(f"{name}: a GGUF buffer must be contiguous")
        view = view.cast("B")
    if len(view) < 8:
        raise ModelFormatError(f"{name}: not a GGUF file (only {len(view)} bytes long)")
    return view.toreadonly()


class _Parser:
    def __init__(self, buf: mmap.mmap | memoryview, name: str, ready: Callable[[int], int] | None = None):
        self.buf, self.name, self.pos, self.size = buf, name, 0, len(buf)
        # bytes readable now: all of them, or those `ready` has reported in place
        self.ready, self.avail = ready, len(buf) if ready is None else 0

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.name}: {what}")

    def have(self, end: int) -> bool:
        """Whether the first `end` bytes exist, waiting for them if they are still arriving."""
        if end <= self.avail:
            return True
        if end > self.size:
            return False
        self.avail = self.ready(end)       # only reached with `ready`: otherwise avail == size
        return True

    def need(self, n: int, what: str) -> None:
        if n > self.avail - self.pos and not self.have(self.pos + n):
            raise self.fail(f"truncated {what} at byte {self.pos} (needs {n} bytes, {self.size - self.pos} left)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos - 8} claims {n} bytes but only {self.size - self.pos} remain")
        self.have(self.pos + n)
        try:
            # str(): mmap slices are bytes, memoryview slices are not (and have no .decode)
            text = str(self.buf[self.pos : self.pos + n], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos} is not valid UTF-8") from None
        self.pos += n
        return text

    def parse(self) -> GGUFFile:
        self.need(4, "header")
        magic = bytes(self.buf[:4])
        if magic != MAGIC:
            raise self.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self.u32("header")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(f"GGUF version {version} is not supported (isthmus reads versions 2 and 3)")
        n_tensors = self.u64("header")
        n_kv = self.u64("header")
        self.check_count(n_kv, 8 + 4 + 1, "metadata entries")
        self.check_count(n_tensors, 8 + 4 + 4 + 8, "tensors")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string("metadata key")
            if key in metadata:
                raise self.fail(f"metadata key {one_line(key)} appears twice")
            vtype = self.u32(f"metadata {one_line(key)}")
            metadata[key] = self.value(vtype, key, 0)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment is {alignment!r}; it must be a positive power of two")

        index = [self.tensor_info() for _ in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors, types = self.map_tensors(index, data_offset, alignment)
        return GGUFFile(self.name, version, metadata, tensors, types, alignment, data_offset, self.buf)

    def check_count(self, count: int, min_size: int, what: str) -> None:
        left = self.size - self.pos
        if count * min_size > left:
            raise self.fail(f"header claims {count} {what} but only {left} bytes remain")

    def value(self, vtype: int, key: str, depth: int) -> Any:
        if vtype in _STRUCTS:
            size = _STRUCTS[vtype].size
            self.need(size, f"metadata {one_line(key)}")
            (v,) = _STRUCTS[vtype].unpack_from(self.buf, self.pos)
            self.pos += size
            return bool(v) if vtype == BOOL else v
        if vtype == STRING:
            return self.string(f"metadata {one_line(key)}")
        if vtype == ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"metadata {one_line(key)} nests arrays deeper than {MAX_NESTING}")
            etype = self.u32(f"metadata {one_line(key)}")
            count = self.u64(f"metadata {one_line(key)}")
            if etype not in _MIN_SIZE:
                raise self.fail(f"metadata {one_line(key)} is an array of unknown value type {etype}")
            if count * _MIN_SIZE[etype] > self.size - self.pos:
                raise self.fail(
                    f"metadata {one_line(key)} claims {count} elements but only {self.size - self.pos} bytes remain"
                )
            return self.array(etype, count, key, depth)
        raise self.fail(f"metadata {one_line(key)} has unknown value type {vtype}")

    def array(self, etype: int, count: int, key: str, depth: int) -> list:
        if count == 0:
            return []
        if etype in _SCALARS:
            # One numpy read for the whole array: token type lists run to 100k+ entries.
            self.have(self.pos + count * np.dtype(_SCALARS[etype]).itemsize)
            values = np.frombuffer(self.buf, dtype=_SCALARS[etype], count=count, offset=self.pos)
            self.pos += values.nbytes
            return values.astype(bool).tolist() if etype == BOOL else values.tolist()
        if etype == STRING:
            return self.strings(count, key)
        return [self.value(etype, key, depth + 1) for _ in range(count)]

    def strings(self, count: int, key: str) -> list[str]:
        # The vocabulary is ~50k-250k strings: keep this loop tight.
        buf, pos, avail, unpack = self.buf, self.pos, self.avail, _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > avail:
                    if not self.have(pos + 8):
                        raise self.fail(f"truncated metadata {one_line(key)} at byte {pos}")
                    avail = self.avail
                (n,) = unpack(buf, pos)
                pos += 8
                if n > avail - pos:
                    if not self.have(pos + n):
                        raise self.fail(f"string in metadata {one_line(key)} at byte {pos - 8} claims {n} bytes "
                                        f"but only {self.size - pos} remain")
                    avail = self.avail
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise self.fail(f"string in metadata {one_line(key)} at byte {pos} is not valid UTF-8") from None
        self.pos = pos
        return out

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string("tensor name")
        shown = one_line(name)
        n_dims = self.u32(f"tensor {shown} info")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {shown} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")
        dims = [self.u64(f"tensor {shown} info") for _ in range(n_dims)]
        if any(d >= 1 << 62 for d in dims):
            raise self.fail(f"tensor {shown} has an absurd dimension in {dims}")
        type_id = self.u32(f"tensor {shown} info")
        offset = self.u64(f"tensor {shown} info")
        return name, tuple(reversed(dims)), type_id, offset

    def map_tensors(self, index, data_offset: int, alignment: int):
        tensors: dict[str, np.ndarray | QuantizedArray] = {}
        types: dict[str, str] = {}
        unsupported = None
        for name, shape, type_id, offset in index:
            shown = one_line(name)
            if name in types:
                raise self.fail(f"tensor {shown} appears twice")
            ggml_type = GGML_TYPES.get(type_id)
            types[name] = ggml_type.name if ggml_type else f"type {type_id}"
            if ggml_type is None or ggml_type.name not in SUPPORTED:
                # Raised after the whole index is checked, so a corrupt file is called corrupt.
                unsupported = unsupported or (type_id, name)
                if ggml_type is None:
                    continue
            n = math.prod(shape)
            cols = shape[-1] if shape else 1
            if cols % ggml_type.block_size:
                raise self.fail(
                    f"tensor {shown} has rows of {cols} values, not a multiple of the "
                    f"{ggml_type.name} block size {ggml_type.block_size}"
                )
            nbytes = n // ggml_type.block_size * ggml_type.type_size
            if offset % alignment:
                raise self.fail(f"tensor {shown} data offset {offset} is not a multiple of the alignment {alignment}")
            start = data_offset + offset
            if start + nbytes > self.size:
                raise self.fail(
                    f"tensor {shown} data ({nbytes} bytes at byte {start}) runs past the end of the file "
                    f"({self.size} bytes); the file is truncated"
                )
            if unsupported is None:
                tensors[name] = self.view(ggml_type.name, shape, start, n, nbytes)
        if unsupported is not None:
            check_supported(unsupported[0], one_line(unsupported[1]))
        return tensors, types

    def view(self, type_name: str, shape: tuple[int, ...], start: int, n: int, nbytes: int):
        dtype = PLAIN_DTYPES.get(type_name)
        if dtype is not None:
            if n == 0:
                arr = np.zeros(shape, dtype)
                arr.flags.writeable = False
                return arr
            return np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).reshape(shape)
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=nbytes, offset=start) if nbytes else np.zeros(0, np.uint8)
        return QuantizedArray(type_name.lower(), shape or (1,), raw)


# --- model configuration ---------------------------------------------------------------------

# Sanity bounds on hyperparameters, which a model file may set to anything: a context of 2**32-1
# would size a KV cache of terabytes. Published models sit far inside them (the longest context,
# Llama 4 Scout's, is 10M; the widest hidden size, Llama 3.1 405B's, is 16384).
MAX_CONTEXT = 1 << 24
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20        # hidden and feed-forward sizes
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 24


def check_limit(value: int, limit: int, key: str, where: str) -> int:
    """`value` of metadata `key`, or a ModelFormatError naming both when it is past `limit`."""
    if value > limit:
        raise ModelFormatError(f"{where}: {key} is {value}, over the limit of {limit} "
                               f"(no real model comes near it; the file is corrupt or hostile)")
    return value
