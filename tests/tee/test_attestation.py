"""Measurement registers, attestation reports, certificate chains and third-party policy checks."""

import json
import time

import pytest

from isthmus.errors import AttestationError, ChainError
from isthmus.runtime.tee import measurement
from isthmus.runtime.tee.attestation import (MODULE_ID, Platform, check_policy, parse_report, pcrs_allowed,
                                             verify_report)
from isthmus.runtime.tee.crypto import canonical, generate_signing_key, sha384

NONCE = bytes(range(32))
KEY = bytes(32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    return Platform.create(tmp_path_factory.mktemp("platform"))


def report(platform, **kw):
    args = dict(pcrs=measurement.expected_pcrs(bytes(48), "reference"), enclave_key=KEY, nonce=NONCE,
                user_data=b"hello")
    return platform.sign_report(**{**args, **kw})


def policy(platform, **kw):
    return {"root_sha256": platform.root_fingerprint, "pcrs": [measurement.expected_pcrs(bytes(48), "reference")],
            "max_age_s": 60, "module_id": MODULE_ID, **kw}


# -- measurement ---------------------------------------------------------------------------------

def test_registers_extend_like_a_tpm():
    r = measurement.Registers()
    assert r.values[0] == bytes(48)
    d1, d2 = sha384(b"a"), sha384(b"b")
    r.extend(0, d1)
    r.extend(0, d2)
    assert r.values[0] == sha384(sha384(bytes(48), d1), d2)
    other = measurement.Registers()
    other.extend(0, d2)
    other.extend(0, d1)
    assert other.values[0] != r.values[0]          # order matters
    with pytest.raises(ValueError):
        r.extend(1, b"short")


def test_pcrs_cover_code_program_and_config():
    base = measurement.expected_pcrs(bytes(48), "reference")
    assert base == measurement.expected_pcrs(bytes(48), "reference")
    other_program = measurement.expected_pcrs(sha384(b"x"), "reference")
    other_target = measurement.expected_pcrs(bytes(48), "numba")
    assert other_program["0"] == base["0"] and other_program["1"] != base["1"] and other_program["2"] == base["2"]
    assert other_target["1"] == base["1"] and other_target["2"] != base["2"]
    assert measurement.measure(None, "reference").values[1] == bytes(48)


def test_runtime_digest_covers_every_package_folder():
    root = measurement._package_root()
    dirs = {d.relative_to(root).as_posix() for d in measurement._package_dirs(root)}
    assert {".", "runtime", "runtime/tee", "compiler", "compiler/passes"} <= dirs
    assert not any(d.startswith(("tests", "benchmarks", "docs")) for d in dirs)
    assert len(measurement.runtime_digest()) == 48


# -- reports and chains --------------------------------------------------------------------------

def test_a_report_verifies_and_carries_its_fields(platform):
    raw = report(platform, debug=False)
    r = verify_report(raw, platform.root_fingerprint)
    assert (r.module_id, r.debug, r.enclave_key, r.user_data, r.nonce) == (MODULE_ID, False, KEY, b"hello", NONCE)
    assert abs(r.timestamp - time.time()) < 30 and r.digest == sha384(raw)
    assert r.pcrs == measurement.expected_pcrs(bytes(48), "reference")


def test_platform_reloads_from_its_folder(tmp_path):
    first = Platform.create(tmp_path)
    again = Platform.load_or_create(tmp_path)
    assert again.root_fingerprint == first.root_fingerprint
    verify_report(report(again), first.root_fingerprint)


def test_a_foreign_chain_is_refused(platform):
    foreign = Platform.create()
    with pytest.raises(ChainError, match="foreign root"):
        verify_report(report(foreign), platform.root_fingerprint)


def test_a_broken_chain_is_refused(platform):
    # An attestation key certified by another key under the pinned root's name, sent with the pinned root.
    impostor = Platform.create(root_key=generate_signing_key(), root_cert=platform.root_cert)
    with pytest.raises(ChainError, match="broken"):
        verify_report(report(impostor), platform.root_fingerprint)


@pytest.mark.parametrize("edit", ["drop", "swap", "garble", "extra"])
def test_malformed_chains_are_refused(platform, edit):
    doc = json.loads(report(platform))
    certs = doc["certificates"]
    doc["certificates"] = {"drop": certs[:1], "swap": certs[::-1], "extra": certs + certs[1:],
                           "garble": [certs[0].replace("M", "N", 3), certs[1]]}[edit]
    with pytest.raises(ChainError):
        verify_report(canonical(doc), platform.root_fingerprint)


def test_an_expired_attestation_certificate_is_refused(platform):
    late = Platform(platform.root_cert, platform.attestation_key, platform.attestation_cert,
                    clock=lambda: time.time() + 400 * 86400)
    with pytest.raises(ChainError, match="not valid"):
        verify_report(report(late), platform.root_fingerprint)


@pytest.mark.parametrize("field,value", [("debug", True), ("nonce", "00" * 32), ("timestamp_ms", -1000),
                                         ("pcrs", {"0": "00" * 48})])
def test_an_edited_report_does_not_verify(platform, field, value):
    doc = json.loads(report(platform))
    doc["body"][field] = doc["body"][field] + value if field == "timestamp_ms" else value
    with pytest.raises(AttestationError, match="signature"):
        verify_report(canonical(doc), platform.root_fingerprint)


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"body": 1, "signature": "", "certificates": []}',
                                 b"\xff" * 10, b"x" * 70000])
def test_malformed_reports(raw):
    with pytest.raises(AttestationError):
        parse_report(raw)


# -- third-party policy --------------------------------------------------------------------------

def test_policy_accepts_a_good_report(platform):
    r = check_policy(report(platform), policy(platform), nonce=NONCE)
    assert r.nonce == NONCE


@pytest.mark.parametrize("case,match", [
    ("nonce", "nonce"), ("stale", "old"), ("debug", "debug"), ("pcr", "allow-list"), ("module", "module"),
    ("root", "foreign root"), ("no-pcrs", "allowed PCR")])
def test_policy_refusals(platform, case, match):
    raw, pol, nonce, now = report(platform), policy(platform), NONCE, None
    if case == "nonce":
        nonce = b"other nonce....."
    elif case == "stale":
        now = time.time() + 3600
    elif case == "debug":
        raw = report(platform, debug=True)
    elif case == "pcr":
        pol["pcrs"] = [measurement.expected_pcrs(sha384(b"another program"), "reference")]
    elif case == "module":
        pol["module_id"] = "something-else"
    elif case == "root":
        pol["root_sha256"] = Platform.create().root_fingerprint
    elif case == "no-pcrs":
        pol["pcrs"] = []
    with pytest.raises(AttestationError, match=match):
        check_policy(raw, pol, nonce=nonce, now=now)


def test_pcr_allow_list_matching():
    pcrs = {"0": "a", "1": "b", "2": "c"}
    assert pcrs_allowed(pcrs, [{"0": "x"}, {"0": "a", "2": "c"}])
    assert not pcrs_allowed(pcrs, [{"0": "a", "1": "x"}])
    assert not pcrs_allowed(pcrs, [{}]) and not pcrs_allowed(pcrs, [])
