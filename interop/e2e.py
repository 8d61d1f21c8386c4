"""End-to-end encrypted message envelopes: the messaging platform carries them, only the enclave reads them.

A client fetches GET /v1/attestation, verifies the report (`isthmus verify`), and takes the enclave's
X25519 public key from it. Each message is then sealed to that key:

    eph      a fresh X25519 key pair, per message
    shared   X25519(eph, enclave)
    key      HKDF-SHA256(shared, salt = eph_pub || enclave_pub,
                         info = "isthmus e2e v1 c2s" || len-prefixed tenant || len-prefixed conversation)
    aad      len-prefixed tenant || len-prefixed conversation || seq (u64, big-endian)
    envelope {"e2e": "isthmus/1", "seq": n, "epk": hex, "nonce": hex, "ct": hex}   (AES-256-GCM)

The enclave derives the same key (tenant and conversation come from the message's routing, not from
the envelope, so an envelope moved to another tenant or conversation fails to open), and accepts a
conversation's envelopes only with strictly increasing `seq`: a replayed or reordered envelope is
rejected. The reply is sealed under the same shared secret with info "... s2c" and the same seq,
so only the sender of that message can read it and a client can match reply to request.

Keys are per tenant because the tenant is bound into the HKDF info. The enclave key comes from the
simulated TEE (`isthmus.runtime.tee.enclave.EnclaveSession`) when the server runs one; otherwise
from `LocalEnclaveKey`, which is NOT attested (say so to users: the operator could read it).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from isthmus.errors import InputError

TAG = "isthmus/1"
MAX_ENVELOPE = 64 << 10


class E2EError(InputError):
    """An envelope that does not open: malformed, forged, for another conversation, or replayed."""


class EnclaveKey(Protocol):
    """What the envelope code needs from the enclave: its public key and X25519 with its private key."""

    @property
    def public_key(self) -> bytes: ...

    def exchange(self, peer_public: bytes) -> bytes: ...


class LocalEnclaveKey:
    """An X25519 key held by this process: for serving without the simulated TEE (not attested)."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self._key = private or X25519PrivateKey.generate()

    @property
    def public_key(self) -> bytes:
        return _raw(self._key.public_key())

    def exchange(self, peer_public: bytes) -> bytes:
        return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))


class SessionKey:
    """The enclave key of a simulated-TEE `EnclaveSession`: the key its attestation reports carry."""

    def __init__(self, session):
        self.session = session

    @property
    def public_key(self) -> bytes:
        return self.session.public_key

    def exchange(self, peer_public: bytes) -> bytes:
        own = getattr(self.session, "exchange", None)
        if own is not None:
            return own(peer_public)
        # EnclaveSession keeps its X25519 key private and has no exchange() yet; the envelope code
        # runs inside the enclave boundary, so it may use the key in place (never copies it out).
        return self.session._key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(4, "big") + b


def aad(tenant: str, conversation: str, seq: int) -> bytes:
    return _lp(tenant) + _lp(conversation) + seq.to_bytes(8, "big")


def _key(shared: bytes, epk: bytes, enclave_pub: bytes, direction: bytes, tenant: str, conversation: str) -> bytes:
    info = b"isthmus e2e v1 " + direction + _lp(tenant) + _lp(conversation)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + enclave_pub, info=info).derive(shared)


def is_envelope(text: str) -> bool:
    return text.lstrip().startswith("{") and f'"{TAG}"' in text


def _parse(text: str, fields: tuple[str, ...]) -> dict:
    if len(text) > MAX_ENVELOPE:
        raise E2EError(f"an envelope is at most {MAX_ENVELOPE} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise E2EError("the envelope is not JSON") from None
    if not isinstance(doc, dict) or doc.get("e2e") != TAG:
        raise E2EError(f"not an {TAG} envelope")
    out = {}
    for f in fields:
        v = doc.get(f)
        if f == "seq":
            if type(v) is not int or not 0 <= v < 2**64:
                raise E2EError("envelope seq must be an integer in [0, 2^64)")
            out[f] = v
        else:
            try:
                out[f] = bytes.fromhex(v) if isinstance(v, str) else None
            except ValueError:
                out[f] = None
            if out[f] is None:
                raise E2EError(f"envelope field {f!r} must be hex")
    if len(out.get("epk", b"\0" * 32)) != 32 or len(out["nonce"]) != 12:
        raise E2EError("envelope epk must be 32 bytes and nonce 12 bytes")
    return out


@dataclass(frozen=True)
class ReplyContext:
    """What sealing the reply to one opened envelope needs (stays inside the enclave)."""
    tenant: str
    conversation: str
    seq: int
    key: bytes


class EnvelopeOpener:
    """The enclave side: opens envelopes, enforces strictly increasing seq, seals replies."""

    def __init__(self, enclave: EnclaveKey):
        self.enclave = enclave
        self._last: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def open(self, text: str, tenant: str, conversation: str) -> tuple[str, ReplyContext]:
        env = _parse(text, ("seq", "epk", "nonce", "ct"))
        pub = self.enclave.public_key
        try:
            shared = self.enclave.exchange(env["epk"])
        except ValueError:
            raise E2EError("the envelope's ephemeral key is not a valid X25519 key") from None
        key = _key(shared, env["epk"], pub, b"c2s", tenant, conversation)
        try:
            plain = AESGCM(key).decrypt(env["nonce"], env["ct"], aad(tenant, conversation, env["seq"]))
        except InvalidTag:
            raise E2EError("the envelope does not open (forged, altered, or for another tenant or conversation)") from None
        with self._lock:       # only after authentication, so a forgery cannot move the counter
            last = self._last.get((tenant, conversation), -1)
            if env["seq"] <= last:
                raise E2EError(f"envelope seq {env['seq']} is not after {last}: a replay or out of order")
            self._last[(tenant, conversation)] = env["seq"]
        try:
            message = plain.decode("utf-8")
        except UnicodeDecodeError:
            raise E2EError("the envelope's plaintext is not UTF-8") from None
        reply_key = _key(shared, env["epk"], pub, b"s2c", tenant, conversation)
        return message, ReplyContext(tenant, conversation, env["seq"], reply_key)

    @staticmethod
    def seal_reply(ctx: ReplyContext, text: str) -> str:
        nonce = os.urandom(12)
        ct = AESGCM(ctx.key).encrypt(nonce, text.encode("utf-8"), aad(ctx.tenant, ctx.conversation, ctx.seq))
        return json.dumps({"e2e": TAG, "seq": ctx.seq, "reply": True, "nonce": nonce.hex(), "ct": ct.hex()},
                          separators=(",", ":"))


class ClientSession:
    """The client side of one conversation (what an integrator's app runs; the tests use it too)."""

    def __init__(self, enclave_public: bytes, tenant: str, conversation: str, first_seq: int = 1):
        if len(enclave_public) != 32:
            raise E2EError("the enclave public key must be 32 bytes (X25519)")
        self.enclave_public, self.tenant, self.conversation = enclave_public, tenant, conversation
        self.seq = first_seq
        self._pending: dict[int, bytes] = {}          # seq -> reply key

    def seal(self, text: str) -> str:
        eph = X25519PrivateKey.generate()
        epk = _raw(eph.public_key())
        shared = eph.exchange(X25519PublicKey.from_public_bytes(self.enclave_public))
        key = _key(shared, epk, self.enclave_public, b"c2s", self.tenant, self.conversation)
        seq, self.seq = self.seq, self.seq + 1
        self._pending[seq] = _key(shared, epk, self.enclave_public, b"s2c", self.tenant, self.conversation)
        nonce = os.urandom(12)
        ct = AESGCM(key).encrypt(nonce, text.encode("utf-8"), aad(self.tenant, self.conversation, seq))
        return json.dumps({"e2e": TAG, "seq": seq, "epk": epk.hex(), "nonce": nonce.hex(), "ct": ct.hex()},
                          separators=(",", ":"))

    def open_reply(self, text: str) -> str:
        env = _parse(text, ("seq", "nonce", "ct"))
        key = self._pending.pop(env["seq"], None)
        if key is None:
            raise E2EError(f"no message with seq {env['seq']} is awaiting a reply")
        try:
            plain = AESGCM(key).decrypt(env["nonce"], env["ct"], aad(self.tenant, self.conversation, env["seq"]))
        except InvalidTag:
            raise E2EError("the reply does not open") from None
        return plain.decode("utf-8", errors="replace")
