"""Conversation state inside the enclave, and sealing idle conversations out of it under a memory budget.

A conversation is (tenant, id) -> its messages, the token ids its KV cache holds, and the decoder
holding that cache. When the resident KV caches exceed the budget, the least recently used idle
conversations are sealed and evicted: messages, token ids and KV arrays are serialised in enclave
memory, encrypted with AES-256-GCM under the tenant's key (HKDF of the session secret and the
tenant id, salted with a random key per blob that only the enclave holds), handed to the blob store
(untrusted: host memory or a folder), and wiped. The next turn restores them. The AAD binds tenant,
conversation id and an eviction counter the enclave keeps, so another tenant's key cannot open a
blob, and an older blob cannot be replayed in place of the latest one. Blobs are keyed by a random
id, so the store learns neither tenant nor conversation.

Callers that keep only messages (the webhook) seal a conversation after every turn (`park`), so its
plaintext exists only while a turn runs. `erase(tenant, conversation)` deletes the blob and zeroises
its per-blob key (a copy of the blob kept elsewhere can no longer be opened), and `expire(retention)`
erases the conversations idle for longer than their tenant's retention period.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from isthmus.errors import InputError, SealError
from isthmus.runtime.tee import kvstate
from isthmus.runtime.tee.crypto import NONCE_BYTES, TAG_BYTES, canonical, hkdf, zeroise

DEFAULT_BUDGET = 256 << 20
_U32 = struct.Struct("<I")


@dataclass(eq=False)
class Conversation:
    tenant: str
    id: str
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    decoder: object = None
    epoch: int = 0                 # evictions so far: the blob must carry the latest
    blob_id: str | None = None     # where the sealed state is, while evicted
    last_used: float = 0.0
    busy: bool = False             # a turn is streaming: never evicted then
    touched: float = field(default_factory=time.time)     # wall-clock time of the last turn (retention)

    @property
    def resident(self) -> bool:
        return self.blob_id is None


class DirectoryBlobStore(MutableMapping):
    """Sealed blobs as files in a folder (one per evicted conversation)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key.isalnum():
            raise KeyError(key)
        return self.dir / f"{key}.sealed"

    def __getitem__(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __setitem__(self, key, value):
        tmp = self._path(key).with_suffix(".part")
        tmp.write_bytes(value)
        os.replace(tmp, self._path(key))

    def __delitem__(self, key):
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __iter__(self):
        return (p.stem for p in self.dir.glob("*.sealed"))

    def __len__(self):
        return sum(1 for _ in self)


class ConversationStore:
    def __init__(self, exe, secret: bytearray, *, budget_bytes: int = DEFAULT_BUDGET,
                 blobs: MutableMapping | None = None):
        self.exe, self._secret = exe, secret
        self.budget = budget_bytes
        self.blobs = blobs if blobs is not None else {}
        self._conversations: dict[tuple[str, str], Conversation] = {}
        self._blob_keys: dict[str, bytearray] = {}      # blob id -> its random key (enclave memory only)
        self._clock = itertools.count()
        self.evictions = self.restores = self.erasures = 0

    def _key(self, tenant: str, blob_id: str) -> algorithms.AES:
        salt = self._blob_keys.get(blob_id)
        if salt is None:
            raise SealError("the key of this sealed conversation is gone (erased)")
        return algorithms.AES(hkdf(self._secret, b"isthmus conversation key v2\0" + tenant.encode(), salt=bytes(salt)))

    def open(self, tenant: str, conversation: str) -> Conversation:
        """The conversation (new if unknown), resident: restored from its sealed blob if it was evicted."""
        if not isinstance(tenant, str) or not isinstance(conversation, str) or not tenant or not conversation:
            raise InputError("a conversation is named by a non-empty tenant and conversation id")
        conv = self._conversations.setdefault((tenant, conversation), Conversation(tenant, conversation))
        if conv.busy:
            raise InputError(f"conversation {conversation!r} already has a turn in progress")
        if not conv.resident:
            self._restore(conv)
        conv.last_used = next(self._clock)
        conv.touched = time.time()
        return conv

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._conversations

    def park(self, conv: Conversation) -> None:
        """Seal a conversation that has no KV cache right away: nothing of it stays plaintext at rest."""
        if conv.resident and not conv.busy and (conv.messages or conv.decoder is not None):
            self.evict(conv)

    def erase(self, tenant: str, conversation: str) -> bool:
        """Forget one conversation for good: its resident state is wiped, its sealed blob deleted and
        the blob's key zeroised. True if there was anything to erase."""
        conv = self._conversations.pop((tenant, conversation), None)
        if conv is None:
            return False
        if conv.decoder is not None:
            kvstate.wipe(conv.decoder)
        conv.decoder, conv.messages, conv.token_ids = None, [], []
        if conv.blob_id is not None:
            self.blobs.pop(conv.blob_id, None)
            key = self._blob_keys.pop(conv.blob_id, None)
            if key is not None:
                zeroise(key)
            conv.blob_id = None
        self.erasures += 1
        return True

    def expire(self, retention_s, now: float | None = None) -> list[tuple[str, str]]:
        """Erase every idle conversation older than its tenant's retention (`retention_s(tenant)` in
        seconds, None for no limit). Returns the erased (tenant, conversation) pairs."""
        now = time.time() if now is None else now
        old = [k for k, c in self._conversations.items()
               if not c.busy and retention_s(c.tenant) is not None and now - c.touched > retention_s(c.tenant)]
        for k in old:
            self.erase(*k)
        return old

    def resident_bytes(self) -> int:
        return sum(kvstate.nbytes(c.decoder) for c in self._conversations.values()
                   if c.resident and c.decoder is not None)

    def enforce_budget(self) -> None:
        """Seal and evict the least recently used idle conversations until the resident caches fit."""
        idle = sorted((c for c in self._conversations.values() if c.resident and not c.busy and c.decoder),
                      key=lambda c: c.last_used)
        for conv in idle:
            if self.resident_bytes() <= self.budget:
                break
            self.evict(conv)

    # -- sealing ---------------------------------------------------------------------------------

    @staticmethod
    def _aad(conv: Conversation) -> bytes:
        return canonical({"tenant": conv.tenant, "conversation": conv.id, "epoch": conv.epoch})

    def evict(self, conv: Conversation) -> None:
        arrays = kvstate.export(conv.decoder) if conv.decoder is not None else []
        if arrays is None:           # a decoder we cannot serialise: keep the tokens, prefill again later
            arrays, tokens = [], []
        else:
            tokens = conv.token_ids
        meta = canonical({"messages": conv.messages, "token_ids": tokens,
                          "arrays": [{"shape": list(a.shape), "dtype": a.dtype.str} for a in arrays]})
        size = _U32.size + len(meta) + sum(a.nbytes for a in arrays)
        plain = bytearray(size)
        try:
            _U32.pack_into(plain, 0, len(meta))
            plain[_U32.size:_U32.size + len(meta)] = meta
            pos = _U32.size + len(meta)
            for a in arrays:
                np.frombuffer(plain, np.uint8, a.nbytes, pos)[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                pos += a.nbytes
            conv.epoch += 1
            blob_id = os.urandom(16).hex()
            self._blob_keys[blob_id] = bytearray(os.urandom(32))
            nonce = os.urandom(NONCE_BYTES)
            enc = Cipher(self._key(conv.tenant, blob_id), modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(self._aad(conv))
            blob = bytearray(NONCE_BYTES + size + TAG_BYTES)
            blob[:NONCE_BYTES] = nonce
            enc.update_into(plain, memoryview(blob)[NONCE_BYTES:NONCE_BYTES + size])
            enc.finalize()
            blob[NONCE_BYTES + size:] = enc.tag
        finally:
            zeroise(plain)
        conv.blob_id = blob_id
        self.blobs[conv.blob_id] = bytes(blob)
        if conv.decoder is not None:
            kvstate.wipe(conv.decoder)
        conv.decoder, conv.messages, conv.token_ids = None, [], []
        self.evictions += 1

    def _restore(self, conv: Conversation) -> None:
        try:
            blob = self.blobs[conv.blob_id]
        except KeyError:
            raise SealError(f"the sealed state of conversation {conv.id!r} is missing from the blob store") from None
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise SealError(f"the sealed state of conversation {conv.id!r} is truncated")
        size = len(blob) - NONCE_BYTES - TAG_BYTES
        plain = bytearray(size)
        dec = Cipher(self._key(conv.tenant, conv.blob_id), modes.GCM(blob[:NONCE_BYTES], blob[-TAG_BYTES:])).decryptor()
        dec.authenticate_additional_data(self._aad(conv))
        dec.update_into(memoryview(blob)[NONCE_BYTES:NONCE_BYTES + size], plain)
        try:
            dec.finalize()
        except InvalidTag:
            zeroise(plain)
            raise SealError(f"the sealed state of conversation {conv.id!r} does not authenticate (tampered, "
                            "replayed, or sealed for another tenant)") from None
        (n,) = _U32.unpack_from(plain, 0)
        meta = json.loads(bytes(plain[_U32.size:_U32.size + n]))
        pos, arrays = _U32.size + n, []
        for spec in meta["arrays"]:
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(plain, dtype, count, pos).reshape(shape))   # views: no plaintext copy
            pos += count * dtype.itemsize
        decoder = kvstate.restore(self.exe, arrays) if arrays else None
        if decoder is None or not _shares(decoder, plain):
            zeroise(plain)            # nothing uses the buffer, or the decoder copied the arrays
        conv.decoder = decoder
        conv.messages = meta["messages"]
        conv.token_ids = meta["token_ids"] if decoder is not None else []   # no cache: prefill again
        del self.blobs[conv.blob_id]
        zeroise(self._blob_keys.pop(conv.blob_id))
        conv.blob_id = None
        self.restores += 1

    def close(self) -> None:
        """Wipe every resident cache and forget every conversation; sealed blobs become unreadable
        with the session secret, which the enclave zeroises."""
        for conv in self._conversations.values():
            if conv.decoder is not None:
                kvstate.wipe(conv.decoder)
            conv.decoder, conv.messages, conv.token_ids = None, [], []
        self._conversations.clear()
        for key in self._blob_keys.values():
            zeroise(key)
        self._blob_keys.clear()


def _shares(decoder, plain: bytearray) -> bool:
    arrays = kvstate.export(decoder) or []
    return any(np.shares_memory(a, np.frombuffer(plain, np.uint8)) for a in arrays)

