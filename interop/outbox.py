"""The webhook's durable state in one SQLite file: the outbox, the de-duplication window and the E2E pins.

* **outbox**: every message the webhook acknowledges is written here, in the same transaction as
  its de-duplication record, before the 200 goes out. A worker answers each conversation's oldest
  entry first, stores the reply's parts (so a failed send is retried, not regenerated), and retries
  sends with exponential backoff until they are delivered or the entry expires. A restart resumes
  from the file: nothing acknowledged is lost.
* **seen**: message ids, kept for `window_s` (platforms redeliver for days); the webhook refuses
  notifications older than the same window, so a replay after an id was forgotten is refused too.
* **pins**: per (tenant, sender) the sender's static E2E key and last seq (interop/envelope.py).

Message and reply text is sealed (AES-256-GCM, AAD = tenant, phone number id, sender and message id)
under the outbox key, so the file holds no plaintext. The key is a file beside the database
(`outbox.key`, mode 0600), the simulation's stand-in for a TEE sealing key bound to the enclave's
measurement: as safe as the file's permissions, like the platform keys (docs/security.md).
`Outbox(":memory:")` keeps everything in memory under a random key (tests, one-off use). One server
holds a file at a time (an exclusive lock on `outbox.sqlite3.lock`): two would deliver every reply twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isthmus.errors import InputError
from isthmus.runtime.tee.crypto import secret_key_file

WEEK = 7 * 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, pnid TEXT NOT NULL, sender TEXT NOT NULL, message_id TEXT NOT NULL,
    payload BLOB NOT NULL,          -- sealed {"text", "ctx"}
    reply BLOB,                     -- sealed list of the bodies to send, once generated
    sent INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_conversation ON outbox (tenant, sender, id);
CREATE TABLE IF NOT EXISTS seen (pnid TEXT NOT NULL, message_id TEXT NOT NULL, at REAL NOT NULL,
                                 PRIMARY KEY (pnid, message_id));
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS pins (tenant TEXT NOT NULL, sender TEXT NOT NULL, spk BLOB NOT NULL,
                                 seq INTEGER NOT NULL, PRIMARY KEY (tenant, sender));
"""


@dataclass
class Entry:
    id: int
    tenant: str
    pnid: str
    sender: str
    message_id: str
    text: str
    ctx: dict | None            # {"seq", "key"} of an E2E message: the reply is sealed to its sender
    reply: list[str] | None     # the bodies to send, once generated
    sent: int
    attempts: int
    expires_at: float


class Outbox:
    def __init__(self, path=":memory:", *, key: bytes | None = None, window_s: float = WEEK, clock=time.time):
        self.path, self.window_s, self.clock = str(path), float(window_s), clock
        memory = self.path == ":memory:"
        self._lockfile = None
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            for name in (self.path, self.path + ".lock"):        # 0600: ids and phone numbers are personal data
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))   # SQLite gives its -wal/-shm the same
            self._lockfile = open(self.path + ".lock", "a")      # one server per outbox: no double delivery
            try:
                fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lockfile.close()
                raise InputError(f"{self.path}: the webhook outbox is in use by another server; give this one "
                                 "its own (whatsapp.outbox)") from None
        self._aead = AESGCM(key if key is not None else os.urandom(32) if memory else _key_file(Path(self.path)))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: cannot open the webhook outbox: {e}") from None
        self._lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()          # releases the lock
                self._lockfile = None

    @contextlib.contextmanager
    def transaction(self):
        """One atomic, durable unit (nests: only the outermost commits)."""
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def _q(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- sealing ---------------------------------------------------------------------------------

    @staticmethod
    def _aad(tenant, pnid, sender, message_id) -> bytes:
        return json.dumps(["isthmus outbox v1", tenant, pnid, sender, message_id]).encode()

    def _seal(self, obj, *ids) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, json.dumps(obj).encode(), self._aad(*ids))

    def _open(self, blob: bytes, *ids):
        try:
            return json.loads(self._aead.decrypt(blob[:12], blob[12:], self._aad(*ids)))
        except (InvalidTag, ValueError):
            return None

    # -- de-duplication --------------------------------------------------------------------------

    def seen(self, pnid: str, message_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM seen WHERE pnid = ? AND message_id = ?", (pnid, message_id)))

    def remember(self, pnid: str, message_id: str) -> None:
        self._q("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (pnid, message_id, self.clock()))

    # -- E2E pins (envelope.PinStore) -----------------------------------------------------------------

    def get_pin(self, tenant: str, sender: str):
        rows = self._q("SELECT spk, seq FROM pins WHERE tenant = ? AND sender = ?", (tenant, sender))
        return (bytes(rows[0][0]), int(rows[0][1]) + 2**63) if rows else None

    def put_pin(self, tenant: str, sender: str, spk: bytes, seq: int) -> None:
        # seq is stored as a signed 64-bit integer: SQLite has no unsigned type
        self._q("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?)", (tenant, sender, spk, seq - 2**63))

    # -- the outbox ------------------------------------------------------------------------------

    def add(self, tenant: str, pnid: str, sender: str, message_id: str, text: str, ctx: dict | None,
            ttl_s: float) -> int:
        now = self.clock()
        payload = self._seal({"text": text, "ctx": ctx}, tenant, pnid, sender, message_id)
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO outbox (tenant, pnid, sender, message_id, payload, next_at, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (tenant, pnid, sender, message_id, payload, now, now, now + ttl_s))
            return cur.lastrowid

    def pending(self, tenant: str | None = None) -> int:
        if tenant is None:
            return self._q("SELECT count(*) FROM outbox")[0][0]
        return self._q("SELECT count(*) FROM outbox WHERE tenant = ?", (tenant,))[0][0]

    def due(self, limit: int, skip: set = frozenset()) -> list[Entry]:
        """The oldest entry of each conversation whose time has come (a conversation's entries go in order)."""
        rows = self._q(
            "SELECT id, tenant, pnid, sender, message_id, payload, reply, sent, attempts, expires_at FROM outbox o "
            "WHERE next_at <= ? AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.tenant = o.tenant "
            "AND p.sender = o.sender AND p.id < o.id) ORDER BY next_at, id LIMIT ?",
            (self.clock(), limit + len(skip)))
        out = []
        for r in rows:
            if (r[1], r[3]) in skip:
                continue
            ids = r[1:5]
            payload = self._open(r[5], *ids)
            reply = self._open(r[6], *ids) if r[6] is not None else None
            if payload is None or (r[6] is not None and reply is None):
                self.done(r[0])           # sealed under another key or altered: it can never be answered
                continue
            out.append(Entry(r[0], *ids, payload["text"], payload["ctx"], reply, r[7], r[8], r[9]))
        return out[:limit]

    def next_due(self) -> float | None:
        rows = self._q("SELECT min(next_at) FROM outbox")
        return rows[0][0] if rows else None

    def resume(self) -> None:
        """At start: entries waiting for a turn are due now (the limits that delayed them were in the
        memory of the last run); sends keep their backoff."""
        now = self.clock()
        self._q("UPDATE outbox SET next_at = ? WHERE reply IS NULL AND next_at > ?", (now, now))

    def set_reply(self, e: Entry, bodies: list[str]) -> None:
        e.reply = bodies
        self._q("UPDATE outbox SET reply = ? WHERE id = ?",
                (self._seal(bodies, e.tenant, e.pnid, e.sender, e.message_id), e.id))

    def mark_sent(self, e: Entry, sent: int) -> None:
        e.sent = sent
        self._q("UPDATE outbox SET sent = ? WHERE id = ?", (sent, e.id))

    def retry(self, e: Entry, delay_s: float, count: bool = True) -> None:
        e.attempts += int(count)
        self._q("UPDATE outbox SET attempts = ?, next_at = ? WHERE id = ?", (e.attempts, self.clock() + delay_s, e.id))

    def done(self, entry_id: int) -> None:
        self._q("DELETE FROM outbox WHERE id = ?", (entry_id,))

    def erase_user(self, tenant: str, sender: str) -> int:
        """Drop a user's queued messages and E2E pin (their de-duplication ids hold no content)."""
        with self.transaction():
            n = self._db.execute("DELETE FROM outbox WHERE tenant = ? AND sender = ?", (tenant, sender)).rowcount
            self._db.execute("DELETE FROM pins WHERE tenant = ? AND sender = ?", (tenant, sender))
        return n

    def purge(self) -> int:
        """Forget message ids older than the window and drop expired entries; returns how many expired."""
        now = self.clock()
        with self.transaction():
            self._db.execute("DELETE FROM seen WHERE at < ?", (now - self.window_s,))
            return self._db.execute("DELETE FROM outbox WHERE expires_at < ?", (now,)).rowcount


def _key_file(db: Path) -> bytes:
    return secret_key_file(db.with_name(db.name + ".key"), 32, "outbox key")
