"""The cryptographic vocabulary of the simulated TEE, built on the `cryptography` package.

Everything signed or hashed is encoded first with `canonical` (sorted keys, no spaces, ASCII),
so the same object always gives the same bytes. Key wrapping to an enclave is X25519 + HKDF-SHA256
+ AES-256-GCM (an HPKE-like base mode with a fresh sender key per message).

Zeroisation is best effort: `zeroise` overwrites a mutable buffer in place, but Python may already
have copied the bytes (immutable `bytes`, intermediate results, the allocator), and OpenSSL keeps its
own key schedule. Nothing here can promise that a secret is gone from memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from isthmus.errors import InputError, SealError

KEY_BYTES = 32          # AES-256
NONCE_BYTES = 12        # AES-GCM
TAG_BYTES = 16


def canonical(obj) -> bytes:
    """The one byte encoding of a JSON object that isthmus signs and hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha384(*parts) -> bytes:
    h = hashlib.sha384()
    for p in parts:
        h.update(p)
    return h.digest()


def hkdf(secret, info: bytes, *, salt: bytes | None = None, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(bytes(secret))


def unhex(text, what: str, size: int | None = None, error=SealError) -> bytes:
    """Hex text from an untrusted document as bytes, or `error` naming the field."""
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        want = f"{size} bytes of hex" if size is not None else "hex"
        raise error(f"{what} is not {want}")
    return raw


WIPE_SPLIT_BYTES = 8 << 20    # buffers at least this large are wiped on every core


def zeroise(buf) -> None:
    """Overwrite a mutable buffer (bytearray, writable memoryview or numpy array) with zeros, best effort."""
    if buf is None:
        return
    try:
        view = memoryview(buf)
    except TypeError:
        return
    if view.readonly or view.nbytes == 0:
        return
    if not view.c_contiguous:
        import numpy as np
        np.asarray(buf)[...] = 0
        return
    at, n = ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B"))), view.nbytes
    if n >= WIPE_SPLIT_BYTES:
        from isthmus.runtime.tee.chunks import POOL_NAME, pool, workers    # (chunks imports this module)
        parts = workers()
        if parts > 1 and not threading.current_thread().name.startswith(POOL_NAME):
            # a model's plaintext (an enclave's memory at close): one memset per core, as a
            # single core's stores reach only a part of the memory's bandwidth (128 MiB: 12 ms on
            # one core, 6 on two, on this project's 2-core VMs); ctypes.memset releases the GIL
            step = (-(-n // parts) + 4095) // 4096 * 4096
            for f in [pool().submit(ctypes.memset, at + k, 0, min(step, n - k)) for k in range(0, n, step)]:
                f.result()
            return
    ctypes.memset(at, 0, n)


# -- owner keys (Ed25519) ------------------------------------------------------------------------

def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey | X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_signing_key(key: Ed25519PrivateKey, path, *, force: bool = False) -> Path:
    """Write a private key as PKCS#8 PEM, readable by its owner only; refuses to overwrite unless `force`."""
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InputError(f"{path}: already exists (use --force to replace it)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def secret_key_file(path, size: int, what: str, error=InputError) -> bytes:
    """The random `size`-byte key kept in `path` (created once, readable by its owner only)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(size))
    except FileExistsError:
        pass
    except OSError as e:
        raise error(f"{path}: cannot create the {what}: {e.strerror}") from None
    try:
        key = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror}") from None
    if len(key) != size:
        raise error(f"{path}: the {what} must be {size} bytes")
    return key


def load_signing_key(path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the key: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InputError(f"{path}: not an unencrypted PEM private key (make one with `isthmus keygen`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 key (make one with `isthmus keygen`)")
    return key


def verify_ed25519(public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


# -- wrapping a secret to an X25519 public key ---------------------------------------------------

WRAP_INFO = b"isthmus key release v1"


def wrap_to(recipient: bytes, secret, aad: bytes) -> dict:
    """Encrypt `secret` so that only the holder of the X25519 key `recipient` can read it; `aad` binds context."""
    eph = X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        raise InputError("the recipient key is not a valid X25519 public key") from None
    key = hkdf(shared, WRAP_INFO, salt=eph_pub + recipient)
    nonce = os.urandom(NONCE_BYTES)
    return {"ephemeral": eph_pub.hex(), "nonce": nonce.hex(),
            "ciphertext": AESGCM(key).encrypt(nonce, bytes(secret), aad).hex()}


def unwrap_with(private: X25519PrivateKey, wrapped: dict, aad: bytes) -> bytearray:
    """The secret `wrap_to` sealed to our public key; SealError if it was not, or was altered."""
    try:
        eph_pub = unhex(wrapped["ephemeral"], "wrapped key: ephemeral", 32)
        nonce = unhex(wrapped["nonce"], "wrapped key: nonce", NONCE_BYTES)
        ct = unhex(wrapped["ciphertext"], "wrapped key: ciphertext")
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except (KeyError, TypeError, ValueError):
        raise SealError("the wrapped data key is malformed") from None
    key = hkdf(shared, WRAP_INFO, salt=eph_pub + public_bytes(private))
    try:
        return bytearray(AESGCM(key).decrypt(nonce, ct, aad))
    except InvalidTag:
        raise SealError("the wrapped data key does not open with this enclave's key and report") from None
