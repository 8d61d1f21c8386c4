"""Attestation: a simulated platform signs reports of what its enclave measured.

The simulated vendor has a root CA (an Ed25519 key and a self-signed X.509 certificate); each
platform has an attestation key whose certificate the root issued. A report is

    {"body": {format, module_id, timestamp_ms, pcrs, debug, enclave_key, user_data, nonce},
     "signature": Ed25519 over "isthmus attestation report v1\\0" || canonical(body),
     "certificates": [attestation certificate PEM, root certificate PEM]}

encoded canonically. A verifier pins the SHA-256 fingerprint of the root certificate (DER), checks
that the attestation certificate was issued by that root and was valid at the report's time, checks
the signature, then applies its policy (freshness, nonce, debug flag, PCR allow-list).

Simulated: on real hardware the attestation key lives in the chip and the operator cannot use it.
Here both private keys are files under $ISTHMUS_HOME/tee/platform, so whoever can read them can
sign any report. The protocol is real; the isolation behind the key is not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from isthmus.errors import AttestationError, ChainError
from isthmus.runtime.tee.crypto import canonical, generate_signing_key, load_signing_key, save_signing_key, sha384, unhex

MODULE_ID = "isthmus-simulated-enclave"
REPORT_FORMAT = 1
_DOMAIN = b"isthmus attestation report v1\0"
_ORG = "isthmus simulated TEE (not hardware)"
MAX_REPORT = 64 << 10


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue_certificate(subject_cn: str, subject_key, issuer_cn: str, issuer_key: Ed25519PrivateKey, *,
                      ca: bool, days: int) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject_cn)).issuer_name(_name(issuer_cn))
            .public_key(subject_key.public_key() if hasattr(subject_key, "private_bytes") else subject_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                         crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
            .sign(issuer_key, algorithm=None))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, as hex: what a verifier pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Platform:
    """The simulated hardware: a vendor root certificate and this machine's attestation key, certified by it."""

    ROOT_CN, KEY_CN = "isthmus simulated root", "isthmus simulated attestation key"

    def __init__(self, root_cert: x509.Certificate, attestation_key: Ed25519PrivateKey,
                 attestation_cert: x509.Certificate, clock=time.time):
        self.root_cert, self.attestation_key, self.attestation_cert = root_cert, attestation_key, attestation_cert
        self.clock = clock

    @classmethod
    def create(cls, directory=None, *, root_key: Ed25519PrivateKey | None = None,
               root_cert: x509.Certificate | None = None, clock=time.time) -> Platform:
        """A new platform: a new root (unless one is given) and a new attestation key it certifies.
        With `directory`, the keys and certificates are written there."""
        root_key = root_key or generate_signing_key()
        root_cert = root_cert or issue_certificate(cls.ROOT_CN, root_key, cls.ROOT_CN, root_key, ca=True, days=3650)
        att_key = generate_signing_key()
        att_cert = issue_certificate(cls.KEY_CN, att_key, cls.ROOT_CN, root_key, ca=False, days=365)
        if directory is not None:
            d = Path(directory)
            d.mkdir(parents=True, exist_ok=True)
            save_signing_key(root_key, d / "root.key", force=True)
            save_signing_key(att_key, d / "attestation.key", force=True)
            (d / "root.pem").write_text(_pem(root_cert))
            (d / "attestation.pem").write_text(_pem(att_cert))
        return cls(root_cert, att_key, att_cert, clock)

    @classmethod
    def load_or_create(cls, directory) -> Platform:
        d = Path(directory)
        if not (d / "attestation.pem").exists():
            return cls.create(d)
        try:
            root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
            cert = x509.load_pem_x509_certificate((d / "attestation.pem").read_bytes())
        except (OSError, ValueError) as e:
            raise AttestationError(f"{d}: the simulated platform's certificates are unreadable ({e})") from None
        return cls(root, load_signing_key(d / "attestation.key"), cert)

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root_cert)

    def sign_report(self, *, pcrs: dict[str, str], enclave_key: bytes, nonce: bytes, user_data: bytes = b"",
                    debug: bool = False, module_id: str = MODULE_ID) -> bytes:
        body = {"format": REPORT_FORMAT, "module_id": module_id, "timestamp_ms": int(self.clock() * 1000),
                "pcrs": dict(pcrs), "debug": bool(debug), "enclave_key": enclave_key.hex(),
                "user_data": user_data.hex(), "nonce": nonce.hex()}
        return canonical({"body": body, "signature": self.attestation_key.sign(_DOMAIN + canonical(body)).hex(),
                          "certificates": [_pem(self.attestation_cert), _pem(self.root_cert)]})


@dataclass(frozen=True)
class Report:
    module_id: str
    timestamp: float            # seconds since the epoch
    pcrs: dict[str, str]
    debug: bool
    enclave_key: bytes
    user_data: bytes
    nonce: bytes
    raw: bytes                  # the report exactly as received
    body: dict
    signature: bytes
    certificates: list[str]

    @property
    def digest(self) -> bytes:
        """H(report): SHA-384 of the report bytes; the key release binds the wrapped key to it."""
        return sha384(self.raw)


_BODY_TYPES = {"format": int, "module_id": str, "timestamp_ms": int, "pcrs": dict, "debug": bool,
               "enclave_key": str, "user_data": str, "nonce": str}


def parse_report(raw: bytes) -> Report:
    """The fields of a report, checked for shape only (no signature or chain check)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_REPORT:
        raise AttestationError(f"a report is at most {MAX_REPORT} bytes of JSON")
    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
        body, sig, certs = doc["body"], doc["signature"], doc["certificates"]
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise AttestationError("the report is not a JSON object with body, signature and certificates") from None
    if not isinstance(body, dict) or set(body) != set(_BODY_TYPES):
        raise AttestationError(f"the report body must have exactly the fields {sorted(_BODY_TYPES)}")
    for key, kind in _BODY_TYPES.items():
        if type(body[key]) is not kind:
            raise AttestationError(f"report field {key} has the wrong type")
    if body["format"] != REPORT_FORMAT:
        raise AttestationError(f"report format {body['format']} is not supported")
    pcrs = body["pcrs"]
    if not all(isinstance(k, str) and k.isdigit() and isinstance(v, str) and len(v) == 96 for k, v in pcrs.items()):
        raise AttestationError("report PCRs must map register numbers to 48-byte hex digests")
    if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs) or not isinstance(sig, str):
        raise AttestationError("report certificates must be a list of PEM strings")
    return Report(module_id=body["module_id"], timestamp=body["timestamp_ms"] / 1000, pcrs=dict(pcrs),
                  debug=body["debug"], enclave_key=unhex(body["enclave_key"], "report enclave_key", 32, AttestationError),
                  user_data=unhex(body["user_data"], "report user_data", None, AttestationError),
                  nonce=unhex(body["nonce"], "report nonce", None, AttestationError), raw=bytes(raw), body=body,
                  signature=unhex(sig, "report signature", 64, AttestationError), certificates=certs)


def verify_chain(certificates: list[str], root_fingerprint: str, at: float) -> Ed25519PublicKey:
    """The attestation public key, if `certificates` is [attestation cert, root cert], the root is the
    pinned one, the root issued the attestation certificate, and it was valid at time `at`."""
    if len(certificates) != 2:
        raise ChainError(f"the certificate chain has {len(certificates)} certificates, expected 2 "
                         "(attestation key, root)")
    try:
        leaf, root = (x509.load_pem_x509_certificate(c.encode()) for c in certificates)
    except ValueError:
        raise ChainError("a certificate in the chain does not parse") from None
    if fingerprint(root) != root_fingerprint.lower():
        raise ChainError(f"the chain ends at a foreign root (SHA-256 {fingerprint(root)[:16]}...), "
                         f"not the pinned simulated root ({root_fingerprint[:16]}...)")
    try:
        root.verify_directly_issued_by(root)
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise ChainError("the chain is broken: the attestation certificate was not issued by the pinned root") from None
    for cert, ca in ((root, True), (leaf, False)):
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is not ca:
                raise ChainError("a certificate in the chain has the wrong CA flag")
        except x509.ExtensionNotFound:
            raise ChainError("a certificate in the chain has no basic constraints") from None
    when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    for cert in (leaf, root):
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise ChainError(f"the certificate {cert.subject.rfc4514_string()} was not valid at the report's time")
    key = leaf.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ChainError("the attestation key is not an Ed25519 key")
    return key


def verify_report(raw: bytes, root_fingerprint: str) -> Report:
    """Parse a report and check its certificate chain against the pinned root and its signature."""
    report = parse_report(raw)
    key = verify_chain(report.certificates, root_fingerprint, report.timestamp)
    try:
        key.verify(report.signature, _DOMAIN + canonical(report.body))
    except InvalidSignature:
        raise AttestationError("the report signature does not verify under its attestation certificate") from None
    return report


def pcrs_allowed(pcrs: dict[str, str], allow_list: list[dict]) -> bool:
    """True when some allow-list entry's registers all equal the report's."""
    return any(isinstance(entry, dict) and entry and all(pcrs.get(k) == v for k, v in entry.items())
               for entry in allow_list)


_NUMBER = (int, float)
POLICY_FIELDS = {"root_sha256": str, "pcrs": list, "max_age_s": _NUMBER, "allow_debug": bool, "module_id": str,
                 "tenant": str, "model": str, "version": int, "min_version": int, "owner_key_sha256": str,
                 "merkle_root": str, "header_sha384": str, "package": str}
# Policy fields checked against the package the report claims (and PCR3 proves): exact matches,
# but min_version, which accepts the package's version or any later one.
PACKAGE_FIELDS = ("tenant", "model", "version", "min_version", "owner_key_sha256", "merkle_root", "header_sha384",
                  "package")


def package_claim(report: Report) -> dict | None:
    """The package identity an enclave states in a verifier's report (`EnclaveSession.claim`), after
    checking that the claim carries the report's nonce and that its digest is what PCR3 measured.
    None when the enclave states that it has loaded no package."""
    from isthmus.runtime.tee.measurement import PACKAGE, expected_package_pcr
    try:
        doc = json.loads(report.user_data)
        ok = isinstance(doc, dict) and set(doc) == {"purpose", "nonce", "package"} and doc["purpose"] == "attestation"
    except (ValueError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok:
        raise AttestationError("the report's user data is not an enclave's package claim (a report from "
                               "`isthmus attest --user-data`, or from an older isthmus?)")
    if doc["nonce"] != report.nonce.hex():
        raise AttestationError("the report's package claim carries another nonce than the report")
    identity = doc["package"]
    if identity is None:
        return None
    if not isinstance(identity, dict) or expected_package_pcr(identity) != report.pcrs.get(str(PACKAGE)):
        raise AttestationError(f"the report's package claim does not match its PCR{PACKAGE} measurement")
    return identity


def _check_package(report: Report, policy: dict) -> None:
    named = [k for k in PACKAGE_FIELDS if k in policy]
    if not named:
        return
    claim = package_claim(report)
    if claim is None:
        raise AttestationError(f"the policy names a package ({', '.join(named)}) but the enclave reports that it "
                               "has loaded none")
    for key in named:
        want, have = policy[key], claim.get("version" if key == "min_version" else key)
        if key == "min_version":
            if not isinstance(have, int) or have < want:
                raise AttestationError(f"the enclave runs version {have}, older than the policy's min_version {want}")
        elif _fold(key, have) != _fold(key, want):
            raise AttestationError(f"the enclave runs a package with {key} {have!r}, not the policy's {want!r}")


def _fold(key: str, value):
    """Hex digests compare case-insensitively; names and versions exactly."""
    return value.lower() if key not in ("tenant", "model") and isinstance(value, str) else value


def check_policy(raw: bytes, policy: dict, *, nonce: bytes | None = None, now: float | None = None) -> Report:
    """What a third party does with a report: every check of `verify_report`, then the policy:

        {"root_sha256": hex, "pcrs": [{"0": hex, "1": hex, "2": hex}, ...], "max_age_s": 300,
         "allow_debug": false, "module_id": "isthmus-simulated-enclave",
         "tenant": "acme", "model": "m", "version": 3 (or "min_version": 3), "owner_key_sha256": hex,
         "merkle_root": hex, "header_sha384": hex, "package": hex}

    and, when given, that the report carries `nonce`. Every field the policy names is enforced; the
    package fields against the identity the enclave claims in its user data, which must match its
    PCR3. A field not listed here is refused, so a misspelt check cannot pass silently.
    AttestationError names the first failed check."""
    if not isinstance(policy, dict) or not isinstance(policy.get("root_sha256"), str):
        raise AttestationError("the policy must be a JSON object with root_sha256 (the pinned root's fingerprint)")
    unknown = sorted(set(policy) - set(POLICY_FIELDS))
    if unknown:
        raise AttestationError(f"the policy has unknown field(s) {', '.join(unknown)}; known: "
                               f"{', '.join(POLICY_FIELDS)}")
    for key, kind in POLICY_FIELDS.items():
        value = policy.get(key)
        if key in policy and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise AttestationError(f"policy field {key} has the wrong type")
    allow = policy.get("pcrs", [])
    if not isinstance(allow, list) or not allow:
        raise AttestationError("the policy must list at least one allowed PCR set under pcrs")
    report = verify_report(raw, policy["root_sha256"])
    now = time.time() if now is None else now
    max_age = policy.get("max_age_s", 300)
    if not isinstance(max_age, (int, float)) or isinstance(max_age, bool):
        raise AttestationError("policy max_age_s must be a number of seconds")
    if not -5 <= now - report.timestamp <= max_age:
        raise AttestationError(f"the report is {now - report.timestamp:.0f} s old; the policy accepts {max_age} s")
    if nonce is not None and report.nonce != nonce:
        raise AttestationError("the report does not carry the expected nonce")
    if report.debug and not policy.get("allow_debug", False):
        raise AttestationError("the report comes from a debug-mode enclave")
    if "module_id" in policy and report.module_id != policy["module_id"]:
        raise AttestationError(f"module {report.module_id!r} is not the policy's {policy['module_id']!r}")
    if not pcrs_allowed(report.pcrs, allow):
        raise AttestationError("the report's PCRs match no entry of the policy's allow-list")
    _check_package(report, policy)
    return report


def default_dir() -> Path:
    from isthmus.models import home
    return home() / "tee" / "platform"


def random_nonce() -> bytes:
    return os.urandom(32)
