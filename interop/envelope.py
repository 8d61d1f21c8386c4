"""End-to-end encrypted message envelopes: the messaging platform carries them, only the enclave reads them,
and only the holder of the sender's static key can write them.

A client fetches GET /v1/attestation, verifies the report (`isthmus verify`), and takes the enclave's
X25519 public key E from it. The client keeps one static X25519 key pair (s, S) for as long as it
talks to this service; the first envelope it sends registers S for (tenant, sender id) (trust on first
use, pinned and persisted). Each message is then sealed like the first message of Noise-KK:

    eph      a fresh X25519 key pair (e, epk), per message
    ikm      X25519(e, E) || X25519(s, E)          # ephemeral-static, then static-static
    key      HKDF-SHA256(ikm, salt = epk || S || E,
                         info = "isthmus e2e v2 c2s" || len-prefixed tenant || len-prefixed conversation)
    aad      "isthmus e2e v2" || len-prefixed tenant || len-prefixed conversation || seq (u64, big-endian)
    envelope {"e2e": "isthmus/2", "seq": n, "spk": hex S, "epk": hex, "nonce": hex, "ct": hex}  (AES-256-GCM)

The static-static term is what authenticates the sender: computing it takes s or the enclave's
private key, so the relay, which sees E, S and every epk, cannot make an envelope that opens. The
ephemeral term gives every message a fresh key. The enclave derives the same key (tenant and
conversation come from the message's routing, not from the envelope, so an envelope moved to another
tenant or conversation fails to open), refuses an S other than the pinned one, and accepts a
conversation's envelopes only with strictly increasing `seq`, at most `MAX_SEQ_STEP` ahead of the
last: a replayed or reordered envelope is rejected. State (pin, seq) changes only after an envelope
has authenticated and decrypted. The reply is sealed under the same key material with info "... s2c"
and the same seq (and a part number, for replies split to fit the platform), so only the sender of
that message can read it and a client can match reply to request.

The enclave key comes from the simulated TEE (`isthmus.runtime.tee.enclave.EnclaveSession`) when the
server runs one; otherwise from `LocalEnclaveKey`, which is NOT attested (the operator could read it).
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

TAG = "isthmus/2"
MAX_ENVELOPE = 64 << 10
MAX_SEQ_STEP = 1 << 20        # a sender's seq may jump ahead, but never to the end of its range at once


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

    @property
    def conversations(self):
        """The enclave's conversation store (runtime/tee/conversations.py), where webhook histories live."""
        return getattr(self.session, "conversations", None)

    def exchange(self, peer_public: bytes) -> bytes:
        own = getattr(self.session, "exchange", None)
        if own is not None:
            return own(peer_public)
        # EnclaveSession keeps its X25519 key private and has no exchange() yet; the envelope code
        # runs inside the enclave boundary, so it may use the key in place (never copies it out).
        return self.session._key.exchange(X25519PublicKey.from_public_bytes(peer_public))


class PinStore(Protocol):
    """Where the enclave keeps each conversation's pinned sender key and last seq (interop/outbox.py
    persists them in SQLite; `MemoryPins` is for tests and one-off use)."""

    def get_pin(self, tenant: str, conversation: str) -> tuple[bytes, int] | None: ...

    def put_pin(self, tenant: str, conversation: str, sender_key: bytes, seq: int) -> None: ...


class MemoryPins:
    def __init__(self):
        self._pins: dict[tuple[str, str], tuple[bytes, int]] = {}

    def get_pin(self, tenant, conversation):
        return self._pins.get((tenant, conversation))

    def put_pin(self, tenant, conversation, sender_key, seq):
        self._pins[(tenant, conversation)] = (sender_key, seq)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(4, "big") + b


def aad(tenant: str, conversation: str, seq: int) -> bytes:
    return b"isthmus e2e v2" + _lp(tenant) + _lp(conversation) + seq.to_bytes(8, "big")


def _reply_aad(ctx: ReplyContext, part: int, parts: int) -> bytes:
    return aad(ctx.tenant, ctx.conversation, ctx.seq) + b"reply" + part.to_bytes(4, "big") + parts.to_bytes(4, "big")


def _key(ikm: bytes, epk: bytes, spk: bytes, enclave_pub: bytes, direction: bytes, tenant: str,
         conversation: str) -> bytes:
    info = b"isthmus e2e v2 " + direction + _lp(tenant) + _lp(conversation)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + spk + enclave_pub, info=info).derive(ikm)


def is_envelope(text: str) -> bool:
    """Whether a message means to be an envelope (of this or an older version): then it must open."""
    return text.lstrip().startswith("{") and '"isthmus/' in text


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
        if f in ("seq", "part", "parts"):
            if type(v) is not int or not 0 <= v < 2**64:
                raise E2EError(f"envelope {f} must be an integer in [0, 2^64)")
            out[f] = v
        else:
            try:
                out[f] = bytes.fromhex(v) if isinstance(v, str) else None
            except ValueError:
                out[f] = None
            if out[f] is None:
                raise E2EError(f"envelope field {f!r} must be hex")
    if any(len(out.get(k, b"\0" * 32)) != 32 for k in ("epk", "spk")) or len(out["nonce"]) != 12:
        raise E2EError("envelope epk and spk must be 32 bytes and nonce 12 bytes")
    return out


@dataclass(frozen=True)
class ReplyContext:
    """What sealing the reply to one opened envelope needs (stays inside the enclave)."""
    tenant: str
    conversation: str
    seq: int
    key: bytes


class EnvelopeOpener:
    """The enclave side: authenticates and opens envelopes, pins sender keys, enforces seq, seals replies."""

    def __init__(self, enclave: EnclaveKey, pins: PinStore | None = None):
        self.enclave = enclave
        self.pins = pins if pins is not None else MemoryPins()
        self._lock = threading.Lock()

    def encrypted(self, tenant: str, conversation: str) -> bool:
        """Whether this conversation began encrypted (then it never takes or sends plaintext)."""
        return self.pins.get_pin(tenant, conversation) is not None

    def open(self, text: str, tenant: str, conversation: str) -> tuple[str, ReplyContext]:
        env = _parse(text, ("seq", "spk", "epk", "nonce", "ct"))
        pub = self.enclave.public_key
        try:
            ikm = self.enclave.exchange(env["epk"]) + self.enclave.exchange(env["spk"])
        except ValueError:
            raise E2EError("the envelope's keys are not valid X25519 keys") from None
        key = _key(ikm, env["epk"], env["spk"], pub, b"c2s", tenant, conversation)
        try:
            plain = AESGCM(key).decrypt(env["nonce"], env["ct"], aad(tenant, conversation, env["seq"]))
        except InvalidTag:
            raise E2EError("the envelope does not open (forged, altered, or for another tenant or conversation)") from None
        try:
            message = plain.decode("utf-8")
        except UnicodeDecodeError:
            raise E2EError("the envelope's plaintext is not UTF-8") from None
        with self._lock:       # only after authentication, so a forgery cannot move the counter or the pin
            pinned = self.pins.get_pin(tenant, conversation)
            if pinned is not None and pinned[0] != env["spk"]:
                raise E2EError("the envelope is signed by a sender key other than the one pinned for this "
                               "conversation")
            last = pinned[1] if pinned is not None else 0
            if pinned is not None and env["seq"] <= last:
                raise E2EError(f"envelope seq {env['seq']} is not after {last}: a replay or out of order")
            if env["seq"] > last + MAX_SEQ_STEP:
                raise E2EError(f"envelope seq {env['seq']} jumps more than {MAX_SEQ_STEP} past {last}")
            self.pins.put_pin(tenant, conversation, env["spk"], env["seq"])
        reply_key = _key(ikm, env["epk"], env["spk"], pub, b"s2c", tenant, conversation)
        return message, ReplyContext(tenant, conversation, env["seq"], reply_key)

    @staticmethod
    def seal_reply(ctx: ReplyContext, text: str, part: int = 0, parts: int = 1) -> str:
        nonce = os.urandom(12)
        ct = AESGCM(ctx.key).encrypt(nonce, text.encode("utf-8"), _reply_aad(ctx, part, parts))
        return json.dumps({"e2e": TAG, "seq": ctx.seq, "reply": True, "part": part, "parts": parts,
                           "nonce": nonce.hex(), "ct": ct.hex()}, separators=(",", ":"))


def sealed_reply_budget(limit_chars: int) -> int:
    """The most UTF-8 bytes of reply text whose sealed envelope stays within `limit_chars` characters."""
    overhead = len(EnvelopeOpener.seal_reply(ReplyContext("", "", 2**64 - 1, b"\0" * 32), "", 2**31, 2**31))
    return (limit_chars - overhead) // 2 - 1


class ClientSession:
    """The client side of one conversation (what an integrator's app runs; the tests use it too).

    `static` is the sender's long-term X25519 key: keep it (the first envelope pins its public half)."""

    def __init__(self, enclave_public: bytes, tenant: str, conversation: str, first_seq: int = 1,
                 static: X25519PrivateKey | None = None):
        if len(enclave_public) != 32:
            raise E2EError("the enclave public key must be 32 bytes (X25519)")
        self.enclave_public, self.tenant, self.conversation = enclave_public, tenant, conversation
        self.static = static or X25519PrivateKey.generate()
        self.static_public = _raw(self.static.public_key())
        self.seq = first_seq
        self._pending: dict[int, tuple[ReplyContext, set]] = {}      # seq -> (reply key, parts opened)

    def seal(self, text: str) -> str:
        eph = X25519PrivateKey.generate()
        epk = _raw(eph.public_key())
        enclave = X25519PublicKey.from_public_bytes(self.enclave_public)
        ikm = eph.exchange(enclave) + self.static.exchange(enclave)
        key = _key(ikm, epk, self.static_public, self.enclave_public, b"c2s", self.tenant, self.conversation)
        seq, self.seq = self.seq, self.seq + 1
        reply_key = _key(ikm, epk, self.static_public, self.enclave_public, b"s2c", self.tenant, self.conversation)
        self._pending[seq] = (ReplyContext(self.tenant, self.conversation, seq, reply_key), set())
        nonce = os.urandom(12)
        ct = AESGCM(key).encrypt(nonce, text.encode("utf-8"), aad(self.tenant, self.conversation, seq))
        return json.dumps({"e2e": TAG, "seq": seq, "spk": self.static_public.hex(), "epk": epk.hex(),
                           "nonce": nonce.hex(), "ct": ct.hex()}, separators=(",", ":"))

    def open_reply(self, text: str) -> str:
        """The text of one reply envelope (one part of the reply, when it came split)."""
        env = _parse(text, ("seq", "nonce", "ct"))
        try:
            doc = json.loads(text)
            part, parts = doc.get("part", 0), doc.get("parts", 1)
        except ValueError:
            part = parts = None
        if type(part) is not int or type(parts) is not int or not 0 <= part < parts <= 2**31:
            raise E2EError("reply part and parts must be integers with 0 <= part < parts")
        pending = self._pending.get(env["seq"])
        if pending is None or part in pending[1]:
            raise E2EError(f"no message with seq {env['seq']} is awaiting a reply (part {part})")
        ctx, opened = pending
        try:
            plain = AESGCM(ctx.key).decrypt(env["nonce"], env["ct"], _reply_aad(ctx, part, parts))
        except InvalidTag:
            raise E2EError("the reply does not open") from None
        opened.add(part)
        if len(opened) == parts:
            del self._pending[env["seq"]]
        return plain.decode("utf-8", errors="replace")
