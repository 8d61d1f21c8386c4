"""The audit log: key releases, attestation requests, erasures and privacy releases, hash-chained.

One JSON object per line (canonical encoding), appended and never rewritten:

    {"seq": 7, "time": 1764180000.123, "event": "key-release", "data": {...}, "prev": "<hex>", "hash": "<hex>"}

    hash = SHA-256("isthmus audit log v1\\0" || canonical(entry without "hash"))
    prev = the previous entry's hash (64 zeros for entry 1); seq counts from 1

so each entry commits to every entry before it. `verify` walks the chain and names the first line
that breaks it: an altered entry (its hash does not match its contents, or the next entry's `prev`
does not match it), a deleted, inserted or moved entry (its `seq` is not its line number). A
deleted *tail* leaves a valid shorter chain; it is caught by the head file written next to the log
after every append (`audit.head`: the last seq and hash) or by a head a verifier kept from an
earlier run (`isthmus audit verify --head HASH`). Whoever can write both files can rewrite history
consistently; only a head kept elsewhere catches that.

Entries name tenants, models, versions and digests, never weights, prompts or replies; user ids
appear only as SHA-256 digests. Appends take an exclusive `flock`, so a server and a CLI on the
same home interleave whole entries. Each entry is one write(2) with O_APPEND; entries are not
fsynced, so a machine crash may lose the last ones (the head file then names the loss).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from isthmus.errors import IsthmusError
from isthmus.runtime.tee.crypto import canonical

GENESIS = "0" * 64
_DOMAIN = b"isthmus audit log v1\0"
_FIELDS = {"seq", "time", "event", "data", "prev", "hash"}


class AuditError(IsthmusError):
    """The audit log is unreadable, or its chain is broken (the message names the line)."""


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_DOMAIN + canonical(body)).hexdigest()


def subject_digest(text: str) -> str:
    """How a user id or conversation id appears in the log: its SHA-256, never the text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def default_path() -> Path:
    from isthmus.models import home
    return home() / "audit" / "audit.jsonl"


class AuditLog:
    """An append-only, hash-chained log at `path` (its head at `path` with suffix .head)."""

    def __init__(self, path, clock=time.time):
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head")
        self.clock = clock
        self._lock = threading.Lock()

    @classmethod
    def local(cls) -> AuditLog:
        """The log of this isthmus home: $ISTHMUS_HOME/audit/audit.jsonl."""
        return cls(default_path())

    def record(self, event: str, **data) -> dict:
        """Append one entry; returns it. `data` must be JSON (names and digests, nothing secret)."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as e:
                raise AuditError(f"{self.path}: cannot open the audit log: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                last = _last_line(fd)
                if last is None:
                    seq, prev = 1, GENESIS
                else:
                    try:
                        doc = json.loads(last)
                        seq, prev = doc["seq"] + 1, doc["hash"]
                    except (ValueError, KeyError, TypeError):
                        raise AuditError(f"{self.path}: the last entry is damaged; "
                                         "run `isthmus audit verify`") from None
                entry = {"seq": seq, "time": round(self.clock(), 3), "event": event, "data": data, "prev": prev}
                entry["hash"] = entry_hash(entry)
                os.write(fd, canonical(entry) + b"\n")
                tmp = self.head_path.with_suffix(".head.part")
                tmp.write_bytes(canonical({"seq": seq, "hash": entry["hash"]}) + b"\n")
                os.replace(tmp, self.head_path)
                return entry
            except OSError as e:
                raise AuditError(f"{self.path}: cannot append to the audit log: {e.strerror}") from None
            finally:
                os.close(fd)


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the file, or None when it is empty."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return None
    tail, pos = b"", end
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        if tail.count(b"\n") >= 2 or pos == 0:
            break
    if not tail.endswith(b"\n"):
        raise AuditError("the audit log ends in a partial entry; run `isthmus audit verify`")
    return tail[:-1].rsplit(b"\n", 1)[-1]


@dataclass(frozen=True)
class Verified:
    entries: int
    head: str                   # the last entry's hash (GENESIS for an empty log)
    head_file: bool             # whether the head file was there to check the tail against


def verify(path, *, head: str | None = None) -> Verified:
    """Check the whole chain of the log at `path`; AuditError names the first line that breaks it.
    With `head` (a hash from an earlier verification), the log must still contain that entry."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"{path}: no audit log there") from None
    except OSError as e:
        raise AuditError(f"{path}: cannot read the audit log: {e.strerror}") from None
    if data and not data.endswith(b"\n"):
        line = data.count(b"\n") + 1
        raise AuditError(f"{path}: line {line}: a partial entry (the log was cut mid-entry)")
    prev, seen_head = GENESIS, head is None
    lines = data.split(b"\n")[:-1] if data else []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and set(entry) == _FIELDS and canonical(entry) == line
        except (ValueError, UnicodeDecodeError, RecursionError):
            ok = False
        if not ok or type(entry["seq"]) is not int or not isinstance(entry["hash"], str):
            raise AuditError(f"{path}: line {n}: not an audit entry (altered or damaged)")
        if entry_hash(entry) != entry["hash"]:
            raise AuditError(f"{path}: line {n}: entry {entry['seq']} was altered "
                             "(its hash does not match its contents)")
        if entry["seq"] != n:
            raise AuditError(f"{path}: line {n}: holds entry {entry['seq']} where entry {n} belongs "
                             f"(an entry was deleted, inserted or moved)")
        if entry["prev"] != prev:
            raise AuditError(f"{path}: line {n}: does not follow the entry before it (line {n - 1} was altered "
                             "or replaced)" if n > 1 else f"{path}: line 1: does not start the chain")
        prev = entry["hash"]
        seen_head = seen_head or prev == head.lower()
    if not seen_head:
        raise AuditError(f"{path}: no entry has the hash {head[:16]}... given with --head "
                         "(the log was truncated or rewritten since)")
    head_file = path.with_suffix(".head")
    try:
        recorded = json.loads(head_file.read_bytes())
        rseq, rhash = recorded["seq"], recorded["hash"]
    except FileNotFoundError:
        return Verified(len(lines), prev, False)
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditError(f"{head_file}: the head file is damaged") from None
    if rseq != len(lines):
        raise AuditError(f"{path}: the log ends at entry {len(lines)} but {head_file.name} records entry {rseq}"
                         + (f": entries {len(lines) + 1}..{rseq} were deleted" if rseq > len(lines) else ""))
    if rhash != prev:
        raise AuditError(f"{path}: line {len(lines)}: the last entry is not the one {head_file.name} records")
    return Verified(len(lines), prev, True)
