"""The key release service: one valid release, and every refusal with its own error type."""

import io
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from isthmus.errors import (ChainError, DebugReportError, KeyReleaseError, MeasurementError, ReplayError,
                            RollbackError, SealError, StaleReportError, TenantMismatchError)
from isthmus.runtime.tee.attestation import Platform
from isthmus.runtime.tee.crypto import generate_signing_key, sha384, unwrap_with
from isthmus.runtime.tee.enclave import EnclaveSession
from isthmus.runtime.tee.keyrelease import KeyReleaseService, key_request, owner_request
from isthmus.runtime.tee.owner import seal_model
from isthmus.runtime.tee.package import read_header, seal, unseal


def ask(tee, pkg, *, platform=None, target="reference", debug=False, nonce=None, user_data=None, kms=None,
        program=None):
    """An enclave that measured `pkg`'s program asks for its key; returns (session, report, response)."""
    session = EnclaveSession(platform or tee.platform, target=target, debug=debug)
    if program is not None:
        session.registers.extend(1, program)
        session.package = pkg
    else:
        session.measure_program(pkg)
    report = session.report(nonce or os.urandom(32), key_request(pkg) if user_data is None else user_data)
    return session, report, (kms or tee.kms).release(report, pkg.signed_bytes())


def refused(exc_type, fn, *args, **kw):
    with pytest.raises(KeyReleaseError) as info:
        fn(*args, **kw)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    return str(info.value)


def test_a_valid_report_gets_the_key(tee, sealed):
    session, report, response = ask(tee, sealed.pkg)
    doc = json.loads(response)
    assert (doc["tenant"], doc["model"], doc["version"]) == ("acme", "tiny-chat", 1)
    dek = unwrap_with(session._key, doc["wrapped"], sha384(report))
    _, buf = unseal(sealed.path, dek)
    assert len(buf) == sealed.pkg.header.payload_size


def test_the_wrapped_key_opens_only_for_that_enclave_and_report(tee, sealed):
    session, report, response = ask(tee, sealed.pkg)
    wrapped = json.loads(response)["wrapped"]
    with pytest.raises(SealError):
        unwrap_with(X25519PrivateKey.generate(), wrapped, sha384(report))     # the operator's key
    with pytest.raises(SealError):
        unwrap_with(session._key, wrapped, sha384(report + b" "))              # another report


def test_replayed_nonce(tee, sealed):
    session, report, _ = ask(tee, sealed.pkg)
    msg = refused(ReplayError, tee.kms.release, report, sealed.pkg.signed_bytes())
    assert "nonce" in msg
    nonce = os.urandom(32)
    ask(tee, sealed.pkg, nonce=nonce)
    refused(ReplayError, ask, tee, sealed.pkg, nonce=nonce)                    # a fresh report, old nonce


def test_replays_stay_refused_after_a_restart(tee, sealed):
    _, report, _ = ask(tee, sealed.pkg)
    tee.kms.close()
    tee.kms = KeyReleaseService(tee.dir / "kms")
    refused(ReplayError, tee.kms.release, report, sealed.pkg.signed_bytes())


def test_stale_timestamp(tee, sealed):
    later = KeyReleaseService(tee.dir / "kms", clock=lambda: __import__("time").time() + 3600)
    refused(StaleReportError, ask, tee, sealed.pkg, kms=later)
    ahead = Platform(tee.platform.root_cert, tee.platform.attestation_key, tee.platform.attestation_cert,
                     clock=lambda: __import__("time").time() + 600)
    refused(StaleReportError, ask, tee, sealed.pkg, platform=ahead)           # from the future


def test_debug_report(tee, sealed):
    refused(DebugReportError, ask, tee, sealed.pkg, debug=True)


def test_wrong_pcr(tee, sealed):
    msg = refused(MeasurementError, ask, tee, sealed.pkg, target="numba")      # config register differs
    assert "PCR2" in msg
    msg = refused(MeasurementError, ask, tee, sealed.pkg, program=sha384(b"another program"))
    assert "PCR1" in msg


def test_broken_chain(tee, sealed):
    impostor = Platform.create(root_key=generate_signing_key(), root_cert=tee.platform.root_cert)
    assert "broken" in refused(ChainError, ask, tee, sealed.pkg, platform=impostor)


def test_foreign_chain(tee, sealed):
    assert "foreign" in refused(ChainError, ask, tee, sealed.pkg, platform=Platform.create())


def test_rolled_back_version(tee, sealed_any):
    sealed = sealed_any
    seal_model(sealed.model, tee.dir / "v2.isth", tenant="acme", owner_key=tee.owner, kms=tee.kms,
               targets=["reference"])
    assert tee.kms.counter("acme", "tiny-chat") == 2
    assert "rollback" in refused(RollbackError, ask, tee, sealed.pkg)
    ask(tee, read_header(tee.dir / "v2.isth"))                                  # the new version is fine
    tee.kms.close()
    tee.kms = KeyReleaseService(tee.dir / "kms")
    refused(RollbackError, ask, tee, sealed.pkg)                               # the counter persists


def test_tenant_a_asking_for_tenant_b_s_key(tee, sealed_any):
    sealed = sealed_any
    # Tenant B seals the same model, so its PCR allow-list is the same as A's.
    seal_model(sealed.model, tee.dir / "b.isth", tenant="bravo", owner_key=generate_signing_key(), kms=tee.kms,
               targets=["reference"])
    b = read_header(tee.dir / "b.isth")
    session = EnclaveSession(tee.platform, target="reference")
    session.measure_program(sealed.pkg)
    report = session.report(os.urandom(32), key_request(sealed.pkg))          # bound to tenant A
    msg = refused(TenantMismatchError, tee.kms.release, report, b.signed_bytes())
    assert "acme" in msg and "bravo" in msg


def test_a_report_bound_to_another_package(tee, sealed_any):
    sealed = sealed_any
    seal_model(sealed.model, tee.dir / "v2.isth", tenant="acme", owner_key=tee.owner, kms=tee.kms,
               targets=["reference"], version=1)
    other = read_header(tee.dir / "v2.isth")
    refused(KeyReleaseError, ask, tee, sealed.pkg, user_data=key_request(other))
    refused(KeyReleaseError, ask, tee, sealed.pkg, user_data=b"not a key request")


def test_a_package_signed_by_another_key_than_the_tenant_s(tee, sealed_any):
    pkg = sealed_any.pkg
    out = io.BytesIO()
    h = pkg.header
    forged = seal(io.BytesIO(b"x" * 100), 100, out, tenant="acme", model=h.model, version=h.version, dek=bytes(32),
                  signer=generate_signing_key(), program_digest=h.program_digest, key_blob=h.key_blob)
    assert "owner key" in refused(KeyReleaseError, ask, tee, forged)


def test_a_key_blob_moved_to_another_package(tee, sealed_any):
    h = sealed_any.pkg.header
    out = io.BytesIO()
    moved = seal(io.BytesIO(b"x" * 100), 100, out, tenant="acme", model=h.model, version=h.version, dek=bytes(32),
                 signer=tee.owner, program_digest=h.program_digest, key_blob=h.key_blob)   # new package id
    assert "key blob" in refused(KeyReleaseError, ask, tee, moved)


def test_registration_rules(tee, sealed):
    allow = sealed.allow
    args = dict(tenant="acme", model="tiny-chat", package=os.urandom(16), pcrs=allow)
    assert "another owner key" in refused(KeyReleaseError, tee.kms.register,
                                          owner_request(generate_signing_key(), version=5, **args))
    refused(RollbackError, tee.kms.register, owner_request(tee.owner, version=0, **args))
    dek, blob = tee.kms.register(owner_request(tee.owner, version=1, **args))   # the same version again is fine
    assert len(dek) == 32 and len(blob) == 12 + 32 + 16
    bad = json.loads(owner_request(tee.owner, version=7, **args))
    bad["request"]["version"] = 8
    assert "signature" in refused(KeyReleaseError, tee.kms.register, json.dumps(bad).encode())
    refused(KeyReleaseError, tee.kms.register, b"{}")


def test_the_service_keeps_its_pinned_root(tee):
    with pytest.raises(KeyReleaseError, match="pins another root"):
        KeyReleaseService(tee.dir / "kms", root_fingerprint=Platform.create().root_fingerprint)
    with pytest.raises(KeyReleaseError, match="root fingerprint"):
        KeyReleaseService(tee.dir / "new-kms")


def test_an_unknown_tenant_or_model(tee, sealed, tmp_path):
    fresh = KeyReleaseService(tmp_path / "other-kms", root_fingerprint=tee.platform.root_fingerprint)
    assert "not registered" in refused(KeyReleaseError, ask, tee, sealed.pkg, kms=fresh)
