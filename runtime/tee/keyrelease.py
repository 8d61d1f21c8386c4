"""The key release service: a KMS-like keeper of data keys that hands one only to an attested enclave.

Owner side (`register`): the owner sends a request signed with its Ed25519 key naming the tenant,
model, version, package id and the allowed PCR sets. The first request for a tenant pins the
owner's key; later ones must use the same key. The service raises the (tenant, model) rollback
counter to the version, stores the PCR allow-list, and returns a fresh data key together with a
blob: the key encrypted under the tenant's key-encryption key (HKDF of the service's master key
and the tenant id) with AAD = (tenant, model, version, package). The blob travels in the package
header; the service keeps no per-package secret.

Enclave side (`release`), given a report and the package header, in this order:
  1. the report's certificate chain ends at the pinned root and its signature verifies  ChainError / AttestationError
  2. its timestamp is within the freshness window                                       StaleReportError
  3. its nonce has never been seen (then it never can be again)                         ReplayError
  4. the enclave is not in debug mode                                                   DebugReportError
  5. the header parses and its signature verifies                                       SealError
  6. the report's user data names this package, for the header's tenant                  TenantMismatchError
  7. the header is signed by the tenant's pinned owner key                               KeyReleaseError
  8. the report's PCRs are in the (tenant, model) allow-list                             MeasurementError
  9. the version is >= the rollback counter                                             RollbackError
then the blob is opened and the data key wrapped to the report's enclave key (X25519 + HKDF-SHA256
+ AES-GCM, AAD = H(report)). Counters, owners, policies and used nonces live in SQLite, so a
restart does not reopen a replay or a rollback.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isthmus.errors import (DebugReportError, IsthmusError, KeyReleaseError, MeasurementError, ReplayError,
                            RollbackError, StaleReportError, TenantMismatchError)
from isthmus.runtime.tee.attestation import pcrs_allowed, verify_report
from isthmus.runtime.tee.crypto import (KEY_BYTES, NONCE_BYTES, canonical, hkdf, public_bytes, secret_key_file, sha384,
                                        unhex, verify_ed25519, wrap_to, zeroise)
from isthmus.runtime.tee.measurement import NAMES
from isthmus.runtime.tee.package import ID_RE, Package, read_header

FRESHNESS_S = 120.0
CLOCK_SKEW_S = 5.0
NONCE_MIN, NONCE_MAX = 16, 64
_REQUEST_DOMAIN = b"isthmus key release owner request v1\0"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owners (tenant TEXT PRIMARY KEY, owner_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (tenant TEXT, model TEXT, version INTEGER NOT NULL, PRIMARY KEY (tenant, model));
CREATE TABLE IF NOT EXISTS policies (tenant TEXT, model TEXT, pcrs TEXT NOT NULL, PRIMARY KEY (tenant, model));
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, seen REAL NOT NULL);
"""


def key_request(pkg: Package) -> bytes:
    """The user data an enclave puts in the report it sends to get `pkg`'s key: it binds the
    report to one package of one tenant."""
    h = pkg.header
    return canonical({"purpose": "key-release", "tenant": h.tenant, "model": h.model, "version": h.version,
                      "package": h.package.hex(), "header": pkg.digest.hex()})


def owner_request(owner_key, *, tenant: str, model: str, version: int, package: bytes, pcrs: list[dict]) -> bytes:
    """A registration request signed by the model owner (see `KeyReleaseService.register`)."""
    fields = {"tenant": tenant, "model": model, "version": version, "package": package.hex(), "pcrs": pcrs}
    return canonical({"request": fields, "owner_key": public_bytes(owner_key).hex(),
                      "signature": owner_key.sign(_REQUEST_DOMAIN + canonical(fields)).hex()})


def _blob_aad(tenant: str, model: str, version: int, package: bytes) -> bytes:
    return canonical({"tenant": tenant, "model": model, "version": version, "package": package.hex()})


class KeyReleaseService:
    """A key release service whose state is a folder: kms.sqlite3 and master.key.

    `root_fingerprint` pins the simulated root; it is stored at creation, and opening the folder
    later with another root is refused."""

    def __init__(self, directory, *, root_fingerprint: str | None = None, freshness_s: float = FRESHNESS_S,
                 clock=time.time, audit=None):
        self.dir = Path(directory)
        self.freshness_s, self.clock = freshness_s, clock
        self.audit = audit              # an audit.AuditLog: every registration, release and refusal is logged
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.dir / "kms.sqlite3", isolation_level=None, timeout=30,
                                       check_same_thread=False)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise KeyReleaseError(f"{self.dir}: cannot open the key release service's state ({e})") from None
        self._master = self._master_key()
        pinned = self._setting("root_sha256")
        if pinned is None:
            if root_fingerprint is None:
                raise KeyReleaseError(f"{self.dir}: a new key release service needs the root fingerprint to pin")
            self._sql("INSERT INTO settings VALUES ('root_sha256', ?)", (root_fingerprint.lower(),))
            pinned = root_fingerprint.lower()
        elif root_fingerprint is not None and root_fingerprint.lower() != pinned:
            raise KeyReleaseError(f"{self.dir}: this key release service pins another root ({pinned[:16]}...)")
        self.root_fingerprint = pinned

    @classmethod
    def local(cls, **kwargs) -> KeyReleaseService:
        """The service under $ISTHMUS_HOME/tee/kms, pinned to this machine's simulated platform root."""
        from isthmus.models import home
        from isthmus.runtime.tee.attestation import Platform, default_dir
        from isthmus.runtime.tee.audit import AuditLog
        platform = Platform.load_or_create(default_dir())
        kwargs.setdefault("audit", AuditLog.local())
        return cls(home() / "tee" / "kms", root_fingerprint=platform.root_fingerprint, **kwargs)

    def close(self) -> None:
        self._db.close()

    # -- storage ---------------------------------------------------------------------------------

    def _master_key(self) -> bytes:
        return secret_key_file(self.dir / "master.key", KEY_BYTES, "master key", KeyReleaseError)

    def _sql(self, query: str, args=()) -> list:
        try:
            with self._lock:
                return self._db.execute(query, args).fetchall()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise KeyReleaseError(f"{self.dir}/kms.sqlite3: {e}") from None

    def _setting(self, key: str) -> str | None:
        rows = self._sql("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def _kek(self, tenant: str) -> AESGCM:
        return AESGCM(hkdf(self._master, b"isthmus kms tenant key v1\0" + tenant.encode()))

    def counter(self, tenant: str, model: str) -> int | None:
        rows = self._sql("SELECT version FROM counters WHERE tenant = ? AND model = ?", (tenant, model))
        return rows[0][0] if rows else None

    def policy(self, tenant: str, model: str) -> list[dict] | None:
        rows = self._sql("SELECT pcrs FROM policies WHERE tenant = ? AND model = ?", (tenant, model))
        return json.loads(rows[0][0]) if rows else None

    # -- owner side ------------------------------------------------------------------------------

    def register(self, signed_request: bytes) -> tuple[bytearray, bytes]:
        """Register a new package version (see the module docstring); returns (data key, key blob)."""
        try:
            doc = json.loads(signed_request)
            fields, owner = doc["request"], unhex(doc["owner_key"], "owner_key", 32, KeyReleaseError)
            signature = unhex(doc["signature"], "signature", 64, KeyReleaseError)
            tenant, model, version = fields["tenant"], fields["model"], fields["version"]
            package, pcrs = unhex(fields["package"], "package", 16, KeyReleaseError), fields["pcrs"]
        except (ValueError, KeyError, TypeError):
            raise KeyReleaseError("the registration request is malformed") from None
        if not verify_ed25519(owner, signature, _REQUEST_DOMAIN + canonical(fields)):
            raise KeyReleaseError("the registration request's signature does not verify")
        if not (isinstance(tenant, str) and ID_RE.match(tenant) and isinstance(model, str) and ID_RE.match(model)
                and type(version) is int and version >= 0):
            raise KeyReleaseError("the registration request names an invalid tenant, model or version")
        if not (isinstance(pcrs, list) and pcrs and all(isinstance(e, dict) and e for e in pcrs)):
            raise KeyReleaseError("the registration request must allow at least one PCR set")
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT owner_key FROM owners WHERE tenant = ?", (tenant,)).fetchone()
                if row and row[0] != owner.hex():
                    raise KeyReleaseError(f"tenant {tenant!r} is registered to another owner key")
                current = db.execute("SELECT version FROM counters WHERE tenant = ? AND model = ?",
                                     (tenant, model)).fetchone()
                if current and version < current[0]:
                    raise RollbackError(f"version {version} of {tenant}/{model} is older than the registered "
                                        f"version {current[0]}; seal with --version {current[0]} or higher")
                db.execute("INSERT OR IGNORE INTO owners VALUES (?, ?)", (tenant, owner.hex()))
                db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", (tenant, model, version))
                db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?)", (tenant, model, json.dumps(pcrs)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if self.audit is not None:
            self.audit.record("package-registration", tenant=tenant, model=model, version=version,
                              package=package.hex(), owner_key_sha256=hashlib.sha256(owner).hexdigest())
        dek = bytearray(os.urandom(KEY_BYTES))
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + self._kek(tenant).encrypt(nonce, bytes(dek), _blob_aad(tenant, model, version, package))
        return dek, blob

    def next_version(self, tenant: str, model: str) -> int:
        current = self.counter(tenant, model)
        return 1 if current is None else current + 1

    # -- enclave side ----------------------------------------------------------------------------

    def release(self, report_raw: bytes, header: bytes) -> bytes:
        """Check a report and a package header (see the module docstring); on success, the data key
        wrapped to the report's enclave key, as canonical JSON {"wrapped": {...}}. With an audit log,
        the release or the refusal (its error type) is logged first; if that fails, nothing is released."""
        if self.audit is None:
            return self._release(report_raw, header)[0]
        digests = {"report_sha384": sha384(report_raw).hex() if isinstance(report_raw, (bytes, bytearray)) else None,
                   "header_sha384": sha384(header).hex() if isinstance(header, (bytes, bytearray)) else None}
        try:
            answer, h = self._release(report_raw, header)
        except IsthmusError as e:
            self.audit.record("key-release", outcome="refused", reason=type(e).__name__, **digests)
            raise
        self.audit.record("key-release", outcome="released", tenant=h.tenant, model=h.model, version=h.version,
                          package=h.package.hex(), **digests)
        return answer

    def _release(self, report_raw: bytes, header: bytes):
        report = verify_report(report_raw, self.root_fingerprint)                        # 1
        now = self.clock()
        age = now - report.timestamp
        if age > self.freshness_s or age < -CLOCK_SKEW_S:                                # 2
            raise StaleReportError(f"the report is {age:.0f} s old; the freshness window is {self.freshness_s:.0f} s")
        self._use_nonce(report.nonce, now)                                               # 3
        if report.debug:                                                                 # 4
            raise DebugReportError("the report comes from a debug-mode enclave; keys are never released to one")
        pkg = read_header(header, name="the package header", check_size=False)          # 5
        h = pkg.header
        self._check_binding(report.user_data, pkg)                                       # 6
        rows = self._sql("SELECT owner_key FROM owners WHERE tenant = ?", (h.tenant,))   # 7
        if not rows:
            raise KeyReleaseError(f"tenant {h.tenant!r} is not registered with this key release service")
        if rows[0][0] != h.owner_key.hex():
            raise KeyReleaseError(f"the package is not signed by tenant {h.tenant!r}'s registered owner key")
        allow = self.policy(h.tenant, h.model)                                           # 8
        if not allow:
            raise KeyReleaseError(f"no key policy for {h.tenant}/{h.model} in this key release service")
        if not pcrs_allowed(report.pcrs, allow):
            raise MeasurementError(f"the report's PCRs are not in the allow-list for {h.tenant}/{h.model}: "
                                   f"{_closest_mismatch(report.pcrs, allow)}")
        counter = self.counter(h.tenant, h.model) or 0                                   # 9
        if h.version < counter:
            raise RollbackError(f"{h.tenant}/{h.model} version {h.version} is older than the rollback counter "
                                f"{counter}")
        try:
            dek = bytearray(self._kek(h.tenant).decrypt(h.key_blob[:NONCE_BYTES], h.key_blob[NONCE_BYTES:],
                                                        _blob_aad(h.tenant, h.model, h.version, h.package)))
        except (InvalidTag, ValueError):
            raise KeyReleaseError("the package's key blob was not issued by this service for this package") from None
        try:
            wrapped = wrap_to(report.enclave_key, dek, report.digest)
        finally:
            zeroise(dek)
        return canonical({"wrapped": wrapped, "tenant": h.tenant, "model": h.model, "version": h.version}), h

    def _use_nonce(self, nonce: bytes, now: float) -> None:
        if not NONCE_MIN <= len(nonce) <= NONCE_MAX:
            raise KeyReleaseError(f"the report nonce is {len(nonce)} bytes; {NONCE_MIN} to {NONCE_MAX} are accepted")
        # A nonce older than the freshness window can go: its report would be refused as stale anyway.
        self._sql("DELETE FROM nonces WHERE seen < ?", (now - 2 * (self.freshness_s + CLOCK_SKEW_S),))
        try:
            self._sql("INSERT INTO nonces VALUES (?, ?)", (nonce.hex(), now))
        except sqlite3.IntegrityError:
            raise ReplayError("the report's nonce has been used before (replayed report)") from None

    @staticmethod
    def _check_binding(user_data: bytes, pkg: Package) -> None:
        try:
            claim = json.loads(user_data)
            tenant = claim["tenant"] if isinstance(claim, dict) and claim.get("purpose") == "key-release" else None
        except (ValueError, KeyError, TypeError):
            tenant = None
        if tenant is None:
            raise KeyReleaseError("the report's user data is not a key request")
        if tenant != pkg.header.tenant:
            raise TenantMismatchError(f"the report is bound to tenant {tenant!r} but asks for a key of tenant "
                                      f"{pkg.header.tenant!r}")
        if user_data != key_request(pkg):
            raise KeyReleaseError("the report is bound to another package than the one whose key it asks for")


_HINTS = {"0": "the isthmus code differs from the code the package was sealed for",
          "1": "another compiled program",
          "2": "a target or isthmus version the owner did not allow (seal with --target)"}


def _closest_mismatch(pcrs: dict, allow: list[dict]) -> str:
    best = min(allow, key=lambda e: sum(pcrs.get(k) != v for k, v in e.items()))
    wrong = [k for k, v in best.items() if pcrs.get(k) != v]
    return "; ".join(f"PCR{k} ({NAMES.get(int(k), '?') if k.isdigit() else '?'}) differs: {_HINTS.get(k, '')}"
                     for k in wrong)
