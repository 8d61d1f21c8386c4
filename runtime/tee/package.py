"""The sealed package (.isth): a signed header, then the payload in AES-256-GCM chunks.

    "ISTHSEAL" | u32 header length | header (canonical JSON) | Ed25519 signature (64 bytes)
    | chunk 0 ciphertext + tag | chunk 1 ciphertext + tag | ... | chunk n-1 ciphertext + tag

The header names the tenant, the model id, a monotonic version, the chunking (chunk size and count,
payload size), the nonce prefix, the digest of the compiled program, the Merkle root of the chunks,
the data key wrapped by the key release service, and the owner's Ed25519 public key; the owner's
signature covers all of it. Chunk i is encrypted under the package's data key with

    nonce = nonce_prefix (8 bytes) || i (u32, big-endian)
    AAD   = H(header) || i (u32, big-endian) || is_final (1 byte)

where H(header) is SHA-384 over the canonical header without its Merkle root (the root is computed
from the ciphertext, so it cannot be inside the chunks' AAD; the signature covers it). A chunk moved
to another index, a chunk from another package, a dropped last chunk or a changed header all fail
authentication. The Merkle tree (SHA-256; leaf = H(0x00 || i || tag_i), node = H(0x01 || left ||
right), an odd node moves up unpaired) is built from the chunk tags alone: GCM has already
authenticated every byte of chunk i into tag_i (under the key, with the header binding, the index
and the final flag in the AAD), so a second hash of every byte would add a pass over the data and
no property; docs/security.md gives the argument. Anyone can check the header, the size and the
tags without the key; the ciphertext itself is checked by whoever holds the key, at unseal.

Sealing and unsealing run AES-GCM on every core in one pass (chunks.py); sealing streams the
payload with a bounded number of groups in flight, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isthmus.errors import SealError
from isthmus.runtime.tee import chunks
from isthmus.runtime.tee.chunks import merkle_root
from isthmus.runtime.tee.crypto import KEY_BYTES, TAG_BYTES, canonical, public_bytes, sha384, unhex, verify_ed25519, zeroise

MAGIC = b"ISTHSEAL"
FORMAT = 2                       # 2: Merkle leaves over the chunk tags (1 hashed the ciphertext)
CIPHER = "AES-256-GCM"
DEFAULT_CHUNK = 1 << 20
MIN_CHUNK, MAX_CHUNK = 16, 64 << 20
MAX_HEADER = 64 << 10
SIG_BYTES = 64
MAX_PAYLOAD = 1 << 48
PROGRESS_FROM = 64 << 20         # show a progress bar for payloads at least this large
SWITCH_SECONDS = 1e-4            # the GIL's switch interval while a package is decrypted in the background
_PREAMBLE = struct.Struct("<8sI")
_SIGN_DOMAIN = b"isthmus sealed package header v1\0"
_BIND_DOMAIN = b"isthmus sealed package binding v1\0"
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}\Z")


@dataclass(frozen=True)
class Header:
    tenant: str
    model: str
    version: int
    package: bytes               # 16 random bytes naming this package
    chunk_size: int
    chunk_count: int
    payload_size: int
    nonce_prefix: bytes          # 8 bytes
    program_digest: bytes        # SHA-384 of the compiled program's IR text
    owner_key: bytes             # Ed25519 public key of the model owner
    key_blob: bytes = b""        # the data key, wrapped by the key release service for this package
    merkle_root: bytes = bytes(32)
    format: int = FORMAT

    def fields(self) -> dict:
        return {"format": self.format, "cipher": CIPHER, "tenant": self.tenant, "model": self.model,
                "version": self.version, "package": self.package.hex(), "chunk_size": self.chunk_size,
                "chunk_count": self.chunk_count, "payload_size": self.payload_size,
                "nonce_prefix": self.nonce_prefix.hex(), "program_digest": self.program_digest.hex(),
                "merkle_root": self.merkle_root.hex(), "key_blob": self.key_blob.hex(),
                "owner_key": self.owner_key.hex()}

    def encode(self) -> bytes:
        return canonical(self.fields())

    def binding(self) -> bytes:
        """H(header): SHA-384 over every field but the Merkle root; the chunks' AAD starts with it."""
        f = self.fields()
        del f["merkle_root"]
        return sha384(_BIND_DOMAIN, canonical(f))

    def chunk_length(self, i: int) -> int:
        """Plaintext bytes in chunk i."""
        return min(self.chunk_size, self.payload_size - i * self.chunk_size)


@dataclass(frozen=True)
class Package:
    """A package's header as read and verified from a file: the parsed fields and the signed bytes."""
    header: Header
    raw: bytes
    signature: bytes
    name: str = field(default="<package>", compare=False)

    @property
    def data_offset(self) -> int:
        return _PREAMBLE.size + len(self.raw) + SIG_BYTES

    @property
    def size(self) -> int:
        h = self.header
        return self.data_offset + h.payload_size + TAG_BYTES * h.chunk_count

    def signed_bytes(self) -> bytes:
        """The header exactly as stored (preamble, header, signature): what a key request carries."""
        return _PREAMBLE.pack(MAGIC, len(self.raw)) + self.raw + self.signature

    @property
    def digest(self) -> bytes:
        return sha384(self.signed_bytes())

    def identity(self) -> dict:
        """What names this package to a verifier: the enclave measures it into PCR3 and states it in
        its reports. `header_sha384` and `merkle_root` pin these exact bytes (the weights included);
        the owner key appears as the SHA-256 of its 32-byte public key."""
        h = self.header
        return {"tenant": h.tenant, "model": h.model, "version": h.version, "package": h.package.hex(),
                "header_sha384": self.digest.hex(), "merkle_root": h.merkle_root.hex(),
                "program_sha384": h.program_digest.hex(), "owner_key_sha256": hashlib.sha256(h.owner_key).hexdigest()}


def chunk_count(payload_size: int, chunk_size: int) -> int:
    return max(1, -(-payload_size // chunk_size))


def _check_key(dek) -> None:
    if memoryview(dek).nbytes != KEY_BYTES:
        raise SealError(f"a data key is {KEY_BYTES} bytes, got {memoryview(dek).nbytes}")


def _progress(label: str, total: int, enabled: bool):
    from isthmus.models import Progress
    return Progress(label, total, enabled and total >= PROGRESS_FROM)


# -- sealing -------------------------------------------------------------------------------------

def seal(src: BinaryIO, payload_size: int, dst, *, tenant: str, model: str, version: int, dek, signer,
         program_digest: bytes, key_blob: bytes = b"", package_id: bytes | None = None,
         nonce_prefix: bytes | None = None, chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> Package:
    """Encrypt `payload_size` bytes read from `src` into a package at `dst` (a path or a seekable
    binary file), signed with the owner's Ed25519 key `signer`. A path is written as `dst.part`
    and renamed when complete, so a failed seal leaves nothing that looks like a package."""
    _check_key(dek)
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise SealError(f"chunk size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
    if not 0 < payload_size < MAX_PAYLOAD:
        raise SealError(f"payload size {payload_size} is out of range")
    for what, value in (("tenant", tenant), ("model id", model)):
        if not isinstance(value, str) or not ID_RE.match(value):
            raise SealError(f"{what} {value!r} must be 1-128 characters of letters, digits and ._:@+- "
                            "starting with a letter or digit")
    if type(version) is not int or not 0 <= version < 1 << 63:
        raise SealError(f"version {version!r} must be a non-negative integer")
    h = Header(tenant=tenant, model=model, version=version, package=package_id or os.urandom(16),
               chunk_size=chunk_size, chunk_count=chunk_count(payload_size, chunk_size), payload_size=payload_size,
               nonce_prefix=nonce_prefix or os.urandom(8), program_digest=program_digest,
               owner_key=public_bytes(signer), key_blob=key_blob)
    if isinstance(dst, (str, os.PathLike)):
        final = Path(dst)
        part = final.with_name(final.name + ".part")
        try:
            with open(part, "wb") as f:
                pkg = _seal_into(src, f, h, dek, signer, progress, direct=True)
            os.replace(part, final)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise SealError(f"{final}: cannot write the package: {e.strerror or e}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return Package(pkg.header, pkg.raw, pkg.signature, str(final))
    return _seal_into(src, dst, h, dek, signer, progress)


def _seal_into(src: BinaryIO, f: BinaryIO, h: Header, dek, signer, progress: bool, direct: bool = False) -> Package:
    """`direct`: `f` is a new file of our own, which the cipher threads may preallocate and write at offsets."""
    start = f.tell()
    placeholder = h.encode()          # same length as the final header: only the root's hex changes
    f.write(_PREAMBLE.pack(MAGIC, len(placeholder)) + placeholder + bytes(SIG_BYTES))
    data_at = f.tell()
    fd = None
    if direct:
        f.flush()
        fd = f.fileno()
        try:                          # allocating the blocks up front doubles the write rate on ext4
            os.posix_fallocate(fd, start, data_at - start + h.payload_size + TAG_BYTES * h.chunk_count)
        except OSError:
            pass

    def read(n: int, scratch: memoryview) -> memoryview:
        if hasattr(src, "readview"):
            return src.readview(n, scratch)
        return scratch[:_read_into(src, scratch[:n])]

    bar = _progress("seal", h.payload_size, progress)
    try:
        tags = chunks.encrypt(chunks.Plan(h, h.binding()), dek, read, f.write, fd=fd, at=data_at,
                              progress=bar.update)
    except EOFError:
        raise SealError(f"the payload ended short of the {h.payload_size} bytes announced") from None
    finally:
        bar.close()
    if src.read(1):
        raise SealError(f"the payload is longer than the {h.payload_size} bytes announced")
    end = data_at + h.payload_size + TAG_BYTES * h.chunk_count
    f.seek(end)
    h = dataclasses.replace(h, merkle_root=merkle_root([chunks.leaf(i, t) for i, t in enumerate(tags)]))
    raw = h.encode()
    signature = signer.sign(_SIGN_DOMAIN + raw)
    f.seek(start)
    f.write(_PREAMBLE.pack(MAGIC, len(raw)) + raw + signature)
    f.seek(end)
    return Package(h, raw, signature)


def _read_into(src: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


# -- reading -------------------------------------------------------------------------------------

class _Source:
    """A package to read from: bytes and BytesIO in place, a path or file through `readinto` (not a
    memory map: a file the host shrinks under a mapping kills the process with SIGBUS; a short read
    is just a SealError). Closes only what it opened."""

    def __init__(self, source, name: str | None):
        self._file, self.view = None, None
        if isinstance(source, (str, os.PathLike)):
            self.name = name or os.fspath(source)
            try:
                self._file = open(source, "rb")
            except FileNotFoundError:
                raise SealError(f"{self.name}: no such file") from None
            except IsADirectoryError:
                raise SealError(f"{self.name}: is a directory, not a sealed package") from None
            except OSError as e:
                raise SealError(f"{self.name}: cannot read: {e.strerror or e}") from None
            self.f = self._file
        else:
            label = getattr(source, "name", None)
            self.name = name or (label if isinstance(label, str) else "<package>")
            if isinstance(source, (bytes, bytearray, memoryview)):
                self.view = memoryview(source).cast("B")
            elif hasattr(source, "getbuffer"):
                self.view = source.getbuffer().cast("B")
            self.f = source
        if self.view is not None:
            self.size = len(self.view)
        else:
            try:
                self.size = self.f.seek(0, io.SEEK_END)
            except OSError as e:
                raise SealError(f"{self.name}: cannot read: {e.strerror or e}") from None
        self._scratch, self._turn = [None, None], 0
        self._lock = threading.Lock()
        try:
            self._fd = self.f.fileno() if self.view is None else None
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None

    def pread(self, pos: int, n: int, scratch: memoryview) -> memoryview:
        """n bytes at pos, safe to call from several threads at once: a view of bytes in memory, or
        read into `scratch` (with `pread` where the source is a real file); SealError if shorter."""
        if self.view is not None:
            if pos + n > self.size:
                raise SealError(f"{self.name}: truncated at byte {self.size}")
            return self.view[pos:pos + n]
        out, got = scratch[:n], 0
        while got < n:
            if self._fd is not None:
                k = os.preadv(self._fd, [out[got:]], pos + got)
            else:
                with self._lock:
                    self.f.seek(pos + got)
                    k = self.f.readinto(out[got:])
            if not k:
                raise SealError(f"{self.name}: truncated at byte {pos + got}")
            got += k
        return out

    def read(self, pos: int, n: int) -> memoryview:
        """n bytes at pos (a view valid until the second read after it: two buffers take turns, so a
        chunk can be hashed while the next is read); SealError if the source is shorter."""
        if self.view is not None:
            if pos + n > self.size:
                raise SealError(f"{self.name}: truncated at byte {self.size}")
            return self.view[pos:pos + n]
        self._turn ^= 1
        if self._scratch[self._turn] is None or len(self._scratch[self._turn]) < n:
            self._scratch[self._turn] = memoryview(bytearray(n))
        out = self._scratch[self._turn][:n]
        self.f.seek(pos)
        got = 0
        while got < n:
            k = self.f.readinto(out[got:])
            if not k:
                raise SealError(f"{self.name}: truncated at byte {pos + got}")
            got += k
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:
                pass      # a caller still holds a slice; the view goes with the last reference
        if self._file is not None:
            self._file.close()


def read_header(source, *, name: str | None = None, check_size: bool = True) -> Package:
    """Read a package's header and check it: magic, canonical JSON, every field's type and range,
    the owner's signature, and (unless `check_size` is false, for a header sent on its own) that the
    file is exactly as long as the header says. SealError otherwise. `source`: a path, a binary file, bytes."""
    with _Source(source, name) as s:
        return _read_header(s, check_size)


def _read_header(s: _Source, check_size: bool = True) -> Package:
    def fail(what: str) -> SealError:
        return SealError(f"{s.name}: {what}")

    if s.size < _PREAMBLE.size or bytes(s.read(0, len(MAGIC))) != MAGIC:
        raise fail("not a sealed isthmus package (bad magic)")
    _, n = _PREAMBLE.unpack_from(s.read(0, _PREAMBLE.size))
    if not 0 < n <= MAX_HEADER:
        raise fail(f"header length {n} is out of range (1..{MAX_HEADER})")
    if s.size < _PREAMBLE.size + n + SIG_BYTES:
        raise fail("truncated inside the header")
    raw = bytes(s.read(_PREAMBLE.size, n))
    signature = bytes(s.read(_PREAMBLE.size + n, SIG_BYTES))
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise fail("the header is not valid JSON") from None
    if not isinstance(fields, dict):
        raise fail("the header is not a JSON object")
    owner = unhex(fields.get("owner_key"), f"{s.name}: header field owner_key", 32)
    if not verify_ed25519(owner, signature, _SIGN_DOMAIN + raw):
        raise fail("the header signature does not verify (the header was altered, or not signed by its owner key)")
    h = _parse_fields(fields, fail)
    if canonical(fields) != raw:
        raise fail("the header is not in canonical form")
    pkg = Package(h, raw, signature, s.name)
    if not check_size:
        return pkg
    if s.size < pkg.size:
        raise fail(f"truncated: {s.size} bytes, the header describes {pkg.size}")
    if s.size > pkg.size:
        raise fail(f"{s.size - pkg.size} unexpected bytes after the last chunk")
    return pkg


_FIELD_TYPES = {"format": int, "cipher": str, "tenant": str, "model": str, "version": int, "package": str,
                "chunk_size": int, "chunk_count": int, "payload_size": int, "nonce_prefix": str,
                "program_digest": str, "merkle_root": str, "key_blob": str, "owner_key": str}


def _parse_fields(f: dict, fail) -> Header:
    if set(f) != set(_FIELD_TYPES):
        raise fail(f"header fields are {sorted(f)}, expected {sorted(_FIELD_TYPES)}")
    for key, kind in _FIELD_TYPES.items():
        if type(f[key]) is not kind:
            raise fail(f"header field {key} is not a{'n integer' if kind is int else ' string'}")
    if f["format"] != FORMAT or f["cipher"] != CIPHER:
        raise fail(f"format {f['format']} / {f['cipher']} is not supported (this isthmus reads {FORMAT} / {CIPHER})")
    for key in ("tenant", "model"):
        if not ID_RE.match(f[key]):
            raise fail(f"header field {key} is not a valid id")
    if not 0 <= f["version"] < 1 << 63:
        raise fail("header field version is out of range")
    if not MIN_CHUNK <= f["chunk_size"] <= MAX_CHUNK or not 0 < f["payload_size"] < MAX_PAYLOAD:
        raise fail("header chunking is out of range")
    if f["chunk_count"] != chunk_count(f["payload_size"], f["chunk_size"]):
        raise fail("header chunk count does not match the payload size and chunk size")

    def hexf(key, size=None):
        return unhex(f[key], f"header field {key}", size, error=lambda m: fail(m))

    return Header(tenant=f["tenant"], model=f["model"], version=f["version"], package=hexf("package", 16),
                  chunk_size=f["chunk_size"], chunk_count=f["chunk_count"], payload_size=f["payload_size"],
                  nonce_prefix=hexf("nonce_prefix", 8), program_digest=hexf("program_digest", 48),
                  owner_key=hexf("owner_key", 32), key_blob=hexf("key_blob"),
                  merkle_root=hexf("merkle_root", 32), format=f["format"])


# -- unsealing -----------------------------------------------------------------------------------

def unseal(source, dek, *, name: str | None = None, progress: bool = False) -> tuple[Package, mmap.mmap]:
    """Decrypt a whole package into one new anonymous, writable mapping (enclave memory), checking
    every chunk and the Merkle root. On any failure the buffer is zeroised and SealError raised."""
    opening = Unsealing(source, dek, name=name, progress=progress)
    try:
        opening.finish()
    except BaseException:
        opening.abort()
        raise
    return opening.package, opening.buffer


class Unsealing:
    """A package being decrypted, in the background and in order of position, into one new
    anonymous mapping (`buffer`, the payload's size): `ready(end)` waits until the payload's first
    `end` bytes have authenticated, so the enclave can parse a model's metadata while its weights
    are still being decrypted; `finish()` waits for every chunk and checks the Merkle root; `abort()`
    stops the workers and zeroises the buffer (the owner calls it on any failure, ours or its own).

    Plaintext is handed out only once GCM has verified its chunk, under a tag bound to this exact
    header, the chunk's index and whether it is the last (docs/security.md): what a reader sees
    before `finish` is the owner's bytes for this package at those positions, never a tampered or
    spliced chunk; a later failure still ends the load, and the buffer is wiped.

    The mapping is not populated first: each cipher thread faults in the pages it decrypts into,
    so the kernel's page zeroing runs on every core and leaves the page in cache for the write
    (128 MiB on a Zen 5 VM: 14.0 ms against 16.2-16.8 populated up front; 42 against 57 ms without
    huge pages)."""

    def __init__(self, source, dek, *, name: str | None = None, progress: bool = False, alongside: bool = False):
        """`alongside`: the caller works while the package is decrypted (the enclave parses): the
        cipher threads leave its core to it."""
        _check_key(dek)
        self._source = _Source(source, name)
        try:
            self.package = pkg = _read_header(self._source)
            h = pkg.header
            self.buffer = _anonymous(h.payload_size)
        except BaseException:
            self._source.__exit__()
            raise
        self.name, self.size = self._source.name, h.payload_size
        self._bar = _progress("unseal", h.payload_size, progress)
        self._view, self._open, self.waited = memoryview(self.buffer), True, 0.0
        _quick_switches.enter()
        self._work = chunks.Decryption(chunks.Plan(h, h.binding()), dek, pkg.data_offset, self._source.pread,
                                       self._view, self._bar.update,
                                       threads=max(1, chunks.workers() - 1) if alongside else None)

    def ready(self, end: int) -> int:
        """Wait until the payload's first `end` bytes (at most its size) are decrypted and
        authenticated; returns how many are (>= end). SealError if a chunk among them does not."""
        end = min(end, self.size)
        if end <= self._work.done:
            return self._work.done
        t0 = time.perf_counter()
        done = self._work.ready(end)
        self.waited += time.perf_counter() - t0
        if done < end:
            _check_chunks(self.name, self.package.header, self._work.tags, self._work.bad)
        return done

    def finish(self) -> Package:
        """Wait for every chunk and check them and the Merkle root (SealError otherwise)."""
        if self._open:
            self.ready(self.size)
            tags, bad = self._work.finish()
            _check_chunks(self.name, self.package.header, tags, bad)
            self._close()
        return self.package

    @property
    def seconds(self) -> float:
        """How long the decryption itself took, from its start to its last chunk (so far)."""
        return self._work.ended - self._work.started

    def abort(self) -> None:
        """Stop the workers, zeroise the buffer and close the source."""
        self._work.stop()
        zeroise(self.buffer)
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            _quick_switches.exit()
            self._bar.close()
            self._view.release()
            self._source.__exit__()


class _SwitchInterval:
    """While a package is decrypted in the background, the interpreter hands the GIL over every
    `seconds` instead of every 5 ms: each cipher thread needs the GIL for a moment between chunks,
    and while the enclave's thread parses Python-heavy metadata it would otherwise wait up to 5 ms
    each time (the default model's 98 chunks took 270-520 ms to decrypt beside the parse, against
    40 ms alone, on a 2-core VM). Counted, so overlapping unseals restore the interval once."""

    def __init__(self, seconds: float):
        self.seconds, self._saved, self._users = seconds, None, 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.seconds))
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_quick_switches = _SwitchInterval(SWITCH_SECONDS)


def _check_chunks(name: str, h: Header, tags: list[bytes], bad: int | None) -> None:
    if bad is not None:
        raise SealError(f"{name}: chunk {bad} of {h.chunk_count} does not authenticate (tampered, "
                        "reordered, spliced from another package, or the wrong key)")
    if merkle_root([chunks.leaf(i, t) for i, t in enumerate(tags)]) != h.merkle_root:
        raise SealError(f"{name}: the chunks' Merkle root does not match the header")


def _anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory, page-aligned, backed by huge pages where the kernel offers them;
    pages fault in as they are written."""
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return mmap.mmap(-1, size)
    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    if hugepage is not None and size >= 2 << 20:
        try:
            buf.madvise(hugepage)
        except (OSError, ValueError):
            pass                 # pages stay small
    return buf


def unseal_stream(source, dek, *, name: str | None = None, progress: bool = False) -> Iterator[memoryview]:
    """Yield the payload chunk by chunk, each only after its tag verifies, holding one chunk of
    plaintext (the view is overwritten by the next chunk). Truncation, reordering and splicing end
    the stream with SealError; the payload is complete only when iteration ends without one."""
    _check_key(dek)
    with _Source(source, name) as s:
        pkg = _read_header(s)
        h = pkg.header
        plan, aes = chunks.Plan(h, h.binding()), AESGCM(bytes(dek))
        plain = bytearray(h.chunk_size)
        view = memoryview(plain)
        pos, tags = pkg.data_offset, []
        try:
            for i in range(h.chunk_count):
                n = h.chunk_length(i)
                chunk = s.read(pos, n + TAG_BYTES)
                pos += n + TAG_BYTES
                iv, ad = plan.params(i)
                try:
                    aes.decrypt_into(iv, chunk, ad, view[:n])
                except InvalidTag:
                    zeroise(plain)
                    _check_chunks(s.name, h, tags, i)
                tags.append(bytes(chunk[n:]))
                yield view[:n]
            _check_chunks(s.name, h, tags, None)
        finally:
            zeroise(plain)


def verify_package(source, *, name: str | None = None) -> Package:
    """Check a package without its key: header, signature, size, and the Merkle root over the chunk
    tags (the ciphertext under each tag is checked by GCM when a key holder unseals it)."""
    with _Source(source, name) as s:
        pkg = _read_header(s)
        h, pos, leaves = pkg.header, pkg.data_offset, []
        for i in range(h.chunk_count):
            n = h.chunk_length(i)
            leaves.append(chunks.leaf(i, s.read(pos + n, TAG_BYTES)))
            pos += n + TAG_BYTES
        if merkle_root(leaves) != h.merkle_root:
            raise SealError(f"{s.name}: the chunks' Merkle root does not match the header")
        return pkg
