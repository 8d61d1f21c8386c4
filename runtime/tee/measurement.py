"""Measurement: SHA-384 digests of what the enclave runs, accumulated in PCR-like registers.

    PCR0  runtime code      every .py file of the isthmus package (path and content), in path order
    PCR1  compiled program  the SHA-384 of the compiled program's IR text (from the sealed header)
    PCR2  config            canonical JSON of the settings that change what runs (target, formats, version)
    PCR3  package identity  the SHA-384 of the loaded package's identity (tenant, model, version, header
                            digest, Merkle root, owner key fingerprint): PCR1 alone cannot tell two
                            packages of the same architecture with different weights apart

A register starts at 48 zero bytes and is only ever extended: PCR = SHA-384(PCR || digest), as a
TPM does, so its final value commits to every digest extended into it and their order. The model
owner computes the same values with `expected_pcrs` when sealing, and the key release service
releases a key only to a report whose registers match that allow-list.

What is not measured: the Python interpreter, numpy, numba, cryptography and every other library;
bytecode caches; the OS. The code is hashed from the files on disk when the process starts, not
from what the interpreter actually loaded. A real TEE measures the whole image that boots.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from isthmus.runtime.tee.crypto import canonical, sha384

RUNTIME, PROGRAM, CONFIG, PACKAGE = 0, 1, 2, 3
NAMES = {RUNTIME: "runtime code", PROGRAM: "compiled program", CONFIG: "config", PACKAGE: "package identity"}
OWNER_PCRS = (RUNTIME, PROGRAM, CONFIG)      # what an owner's allow-list pins (PCR3 is known only after sealing)
DIGEST_BYTES = 48
TEE_FORMAT = 1


class Registers:
    """PCR-like registers: extend-only, with a log of what was extended (index, label, digest)."""

    def __init__(self, count: int = len(NAMES)):
        self.values = [bytes(DIGEST_BYTES) for _ in range(count)]
        self.log: list[tuple[int, str, bytes]] = []

    def extend(self, index: int, digest: bytes, label: str = "") -> None:
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a measurement is a {DIGEST_BYTES}-byte SHA-384 digest")
        self.values[index] = sha384(self.values[index], digest)
        self.log.append((index, label, digest))

    def as_dict(self) -> dict[str, str]:
        return {str(i): v.hex() for i, v in enumerate(self.values)}


def _package_root() -> Path:
    import isthmus
    return Path(isthmus.__file__).resolve().parent


def _package_dirs(root: Path) -> list[Path]:
    """The package's folders: the root, then every folder reachable through folders with an __init__.py."""
    dirs, todo = [], [root]
    while todo:
        d = todo.pop()
        dirs.append(d)
        todo += [c for c in d.iterdir() if c.is_dir() and (c / "__init__.py").is_file()]
    return sorted(dirs)


@functools.lru_cache(maxsize=1)
def runtime_digest() -> bytes:
    """SHA-384 over the isthmus package's source: each file's relative path and SHA-384, in order.
    Measured once per process (the enclave measures at start-up)."""
    root = _package_root()
    h = hashlib.sha384(b"isthmus runtime v1\0")
    for d in _package_dirs(root):
        for f in sorted(d.glob("*.py")):
            rel = f.relative_to(root).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel + sha384(f.read_bytes()))
    return h.digest()


def config_document(target: str) -> dict:
    from isthmus import __version__
    return {"isthmus": __version__, "target": target, "tee_format": TEE_FORMAT}


def config_digest(target: str) -> bytes:
    return sha384(canonical(config_document(target)))


def program_digest(program_text: str) -> bytes:
    return sha384(program_text.encode())


def identity_digest(identity: dict) -> bytes:
    """The measurement of a package identity (`Package.identity()`), extended into PCR3."""
    return sha384(b"isthmus package identity v1\0", canonical(identity))


def expected_package_pcr(identity: dict) -> str:
    """PCR3 of an enclave that loaded the package with this identity, as hex."""
    return sha384(bytes(DIGEST_BYTES), identity_digest(identity)).hex()


def measure(program: bytes | None, target: str) -> Registers:
    """The registers of an enclave running `program` (a digest, or None before any is loaded) on `target`."""
    r = Registers()
    r.extend(RUNTIME, runtime_digest(), "isthmus package source")
    if program is not None:
        r.extend(PROGRAM, program, "compiled program")
    r.extend(CONFIG, config_digest(target), f"config target={target}")
    return r


def expected_pcrs(program: bytes, target: str) -> dict[str, str]:
    """What an honest enclave reports for `program` on `target` in PCR0-2: an owner's allow-list entry."""
    values = measure(program, target).as_dict()
    return {str(i): values[str(i)] for i in OWNER_PCRS}
