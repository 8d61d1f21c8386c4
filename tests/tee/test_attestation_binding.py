"""Issue 13, finding 2: the attestation report binds the package actually loaded, and `isthmus verify`
enforces every field a policy names (and refuses fields it does not know)."""

import json
import os

import httpx
import pytest

from isthmus.cli import build_parser
from isthmus.errors import AttestationError
from isthmus.runtime.tee.attestation import PACKAGE_FIELDS, check_policy, package_claim
from isthmus.runtime.tee.crypto import canonical
from isthmus.runtime.tee.enclave import EnclaveSession
from isthmus.runtime.tee.owner import policy_for, seal_model
from live_server import live_server  # tests/support
from tiny_models import write_tiny_chat_gguf  # tests/support
from cli_runner import run, one_line_error  # tests/support

NONCE = bytes(range(16))


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """The same architecture as `chat_gguf`, other weights, the same file name (so the same model id)."""
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("other") / "tiny-chat.gguf", seed=1)




def test_a_server_running_another_tenants_package_fails_the_first_tenants_policy(home, capsys, chat_gguf,
                                                                                  other_gguf):
    from isthmus.interop.cli import build

    for key in ("a.key", "b.key"):
        assert run(capsys, "keygen", "-o", key)[0] == 0
    for tenant, gguf, key in (("acme", chat_gguf, "a.key"), ("beta", other_gguf, "b.key")):
        rc, out, err = run(capsys, "seal", gguf, "--tenant", tenant, "--owner-key", key, "-o", f"{tenant}.isth",
                           "--target", "reference", "--chunk-size", "8192", "--policy-out", f"{tenant}.json")
        assert rc == 0, err
    acme, beta = (json.loads((home / f"{t}.json").read_text()) for t in ("acme", "beta"))
    assert acme["pcrs"] == beta["pcrs"]     # the finding: same code, same program, so PCR0-2 cannot tell them apart

    app, session, _ = build(build_parser().parse_args(["serve", "--sealed", "beta.isth", "--target", "reference"]))
    try:
        with live_server(app) as url:
            nonce = os.urandom(16)
            r = httpx.get(url + "/v1/attestation", params={"nonce": nonce.hex()})
    finally:
        session.close()
    assert r.status_code == 200
    (home / "report.json").write_bytes(r.content)
    claim = json.loads(bytes.fromhex(r.json()["body"]["user_data"]))
    assert claim["nonce"] == nonce.hex() and claim["package"]["tenant"] == "beta"
    assert claim["package"]["merkle_root"] == beta["merkle_root"]

    rc, _, err = run(capsys, "verify", "report.json", "--policy", "acme.json", "--nonce", nonce.hex())
    one_line_error(rc, err, "tenant 'beta'", "'acme'")
    rc, out, err = run(capsys, "verify", "report.json", "--policy", "beta.json", "--nonce", nonce.hex())
    assert rc == 0 and "package beta/tiny-chat version 1" in out and "PCR3 matches" in out, err

    # a policy field verify does not know is refused, not ignored
    (home / "typo.json").write_text(json.dumps({**beta, "tennant": "beta"}))
    one_line_error(*run(capsys, "verify", "report.json", "--policy", "typo.json")[::2], "unknown", "tennant")
    (home / "typed.json").write_text(json.dumps({**beta, "version": "1"}))
    one_line_error(*run(capsys, "verify", "report.json", "--policy", "typed.json")[::2], "version", "wrong type")


@pytest.fixture
def two_packages(tee, chat_gguf, other_gguf):
    """acme/tiny-chat version 1 sealed twice by its owner, with different weights (the KMS accepts an
    equal version), and the policy of the first."""
    first, allow = seal_model(chat_gguf, tee.dir / "first.isth", tenant="acme", owner_key=tee.owner, kms=tee.kms,
                              targets=["reference"], chunk_size=4096)
    second, _ = seal_model(other_gguf, tee.dir / "second.isth", tenant="acme", owner_key=tee.owner, kms=tee.kms,
                           targets=["reference"], chunk_size=4096, version=1)
    assert first.header.program_digest == second.header.program_digest
    return first, second, policy_for(first, allow, tee.platform.root_fingerprint)


def report_of(tee, pkg, user_data=None):
    session = EnclaveSession(tee.platform, target="reference")
    session.measure_program(pkg)
    return session.report(NONCE, user_data)


def test_the_report_names_the_weights_not_only_the_program(tee, two_packages):
    first, second, policy = two_packages
    assert check_policy(report_of(tee, first), policy, nonce=NONCE).pcrs["3"]
    with pytest.raises(AttestationError, match="merkle_root"):
        check_policy(report_of(tee, second), policy, nonce=NONCE)


@pytest.mark.parametrize("field, value, match", [
    ("tenant", "other", "tenant"), ("model", "other", "model"), ("version", 2, "version"),
    ("min_version", 2, "min_version"), ("owner_key_sha256", "ab" * 32, "owner_key_sha256"),
    ("header_sha384", "cd" * 48, "header_sha384"), ("package", "ef" * 16, "package")])
def test_every_package_field_of_a_policy_is_enforced(tee, two_packages, field, value, match):
    first, _, policy = two_packages
    raw = report_of(tee, first)
    identity = first.identity()
    if field != "min_version":          # the right value passes (hex in either case)
        right = identity[field].upper() if field in ("header_sha384", "package") else identity[field]
        check_policy(raw, {**policy, field: right}, nonce=NONCE)
    else:
        check_policy(raw, {**policy, "min_version": 1}, nonce=NONCE)
    with pytest.raises(AttestationError, match=match):
        check_policy(raw, {**policy, field: value}, nonce=NONCE)


def test_a_claim_is_only_believed_when_pcr3_measured_it(tee, two_packages):
    first, second, policy = two_packages
    forged = canonical({"purpose": "attestation", "nonce": NONCE.hex(), "package": first.identity()})
    with pytest.raises(AttestationError, match="PCR3"):     # enclave of `second` claiming to run `first`
        check_policy(report_of(tee, second, forged), policy, nonce=NONCE)
    with pytest.raises(AttestationError, match="not an enclave's package claim"):
        check_policy(report_of(tee, first, b"chosen by the operator"), policy, nonce=NONCE)
    stale = canonical({"purpose": "attestation", "nonce": "00" * 16, "package": first.identity()})
    with pytest.raises(AttestationError, match="another nonce"):
        check_policy(report_of(tee, first, stale), policy, nonce=NONCE)

    bare = EnclaveSession(tee.platform, target="reference")      # has measured no package
    raw = bare.report(NONCE)
    code_only = {k: v for k, v in policy.items() if k not in PACKAGE_FIELDS} | {"pcrs": [{"0": bare.pcrs["0"]}]}
    assert package_claim(check_policy(raw, code_only, nonce=NONCE)) is None
    with pytest.raises(AttestationError, match="has loaded none"):
        check_policy(raw, {**code_only, "tenant": "acme"}, nonce=NONCE)


def test_a_report_that_cannot_be_audited_is_a_503_not_a_500(tee, tmp_path):
    from isthmus.interop.app import create_app
    from isthmus.runtime.tee.audit import AuditLog

    (tmp_path / "blocked").mkdir()
    session = EnclaveSession(tee.platform, target="reference", audit=AuditLog(tmp_path / "blocked"))  # a folder
    with live_server(create_app({}, attestation=session)) as url:
        r = httpx.get(url + "/v1/attestation", params={"nonce": "ab" * 16})
    assert r.status_code == 503 and r.json()["error"]["code"] == "attestation_unavailable"
