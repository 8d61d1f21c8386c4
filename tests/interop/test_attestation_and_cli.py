"""GET /v1/attestation with the simulated TEE's enclave session, envelopes to its key, and `isthmus serve`."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from isthmus.cli import main
from isthmus.interop.envelope import ClientSession, EnvelopeOpener, SessionKey


@pytest.fixture(scope="module")
def tee_server(live, tiny_chat):
    from isthmus.interop.app import create_app
    from isthmus.runtime.tee.attestation import Platform
    from isthmus.runtime.tee.enclave import EnclaveSession

    platform = Platform.create()                       # in memory: nothing written under ISTHMUS_HOME
    session = EnclaveSession(platform, target="reference")
    s = live.start(create_app({"tiny-chat": tiny_chat.engine()}, attestation=session))
    s.platform, s.session = platform, session
    yield s
    session.close()


def test_attestation_report_verifies_and_carries_the_nonce(tee_server):
    from isthmus.runtime.tee.attestation import verify_report

    nonce = os.urandom(24)
    r = httpx.get(tee_server.url + "/v1/attestation", params={"nonce": nonce.hex()})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    report = verify_report(r.content, tee_server.platform.root_fingerprint)
    assert report.nonce == nonce and report.enclave_key == tee_server.session.public_key and not report.debug
    for bad in ("", "abc", "zz", "00" * 65):
        r = httpx.get(tee_server.url + "/v1/attestation", params={"nonce": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "nonce"


def test_envelopes_open_with_the_attested_enclave_key(tee_server):
    from isthmus.runtime.tee.attestation import verify_report

    raw = httpx.get(tee_server.url + "/v1/attestation", params={"nonce": "01"}).content
    enclave_pub = verify_report(raw, tee_server.platform.root_fingerprint).enclave_key
    client = ClientSession(enclave_pub, "acme", "conv-1")
    opener = EnvelopeOpener(SessionKey(tee_server.session))
    text, ctx = opener.open(client.seal("sealed hello"), "acme", "conv-1")
    assert text == "sealed hello" and client.open_reply(opener.seal_reply(ctx, "ok")) == "ok"


def test_without_the_tee_attestation_is_503(server):
    r = httpx.get(server.url + "/v1/attestation", params={"nonce": "00ff"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "attestation_unavailable"


# -- isthmus serve ---------------------------------------------------------------------------------

def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


def test_serve_user_mistakes_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["serve", "--port", "70000"], "--port")
    _one_line_error(capsys, ["serve", "--port", "0", "--tenants", str(tmp_path / "nope.toml")], "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tenants]]\nid = "a"\napi_key_sha256 = ["not-a-hash"]\n')
    _one_line_error(capsys, ["serve", "--port", "0", "--tenants", str(bad)], "api_key_sha256")
    bad.write_text("[[tenants]\n")
    _one_line_error(capsys, ["serve", "--port", "0", "--tenants", str(bad)], "TOML")
    _one_line_error(capsys, ["serve", "--max-batch", "many"], "--max-batch")
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        _one_line_error(capsys, ["serve", "--port", str(taken.getsockname()[1])], "cannot listen on")


def test_new_key_prints_a_key_and_its_hash(capsys):
    from isthmus.interop.tenants import hash_key
    assert main(["serve", "--new-key"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"sk-isthmus-\S+", out).group(0)
    assert hash_key(key) in out


def test_isthmus_serve_as_a_process(tiny_chat, tmp_path):
    """The command as a user runs it: a tenants file, --port 0, the openai client, Ctrl-C."""
    import openai
    from isthmus.interop.tenants import hash_key

    key = "sk-cli-test-0123456789"
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenants]]\nid = "me"\napi_key_sha256 = ["{hash_key(key)}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "isthmus.cli", "serve", "--model", str(tiny_chat.path),
                             "--target", "reference", "--port", "0", "--tenants", str(tenants), "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        url = m.group(0)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url[:-3] + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=6, temperature=0)
        want, _ = tiny_chat.expected([{"role": "user", "content": "Hello there"}], max_tokens=6)
        assert r.choices[0].message.content == want
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sk-nope-000000", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_serving_a_sealed_model_end_to_end(live, tiny_chat, tmp_path, monkeypatch, capsys):
    """Owner seals the tiny model; `isthmus serve --sealed` runs it in the simulated enclave; a client
    checks the served report against the owner's policy and its own nonce, then chats."""
    import json

    import openai
    from isthmus.cli import build_parser
    from isthmus.interop.cli import build
    from isthmus.runtime.tee.attestation import check_policy

    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "-o", "owner.key"]) == 0
    assert main(["seal", str(tiny_chat.path), "--tenant", "acme", "--owner-key", "owner.key", "-o", "m.isth",
                 "--target", "reference", "--policy-out", "policy.json"]) == 0
    capsys.readouterr()
    args = build_parser().parse_args(["serve", "--sealed", "m.isth", "--target", "reference"])
    app, session, _ = build(args)
    s = live.start(app)
    try:
        nonce = os.urandom(16)
        raw = httpx.get(s.url + "/v1/attestation", params={"nonce": nonce.hex()}).content
        report = check_policy(raw, json.loads((tmp_path / "policy.json").read_text()), nonce=nonce)
        assert report.enclave_key == session.public_key
        model_id = next(iter(app.state.isthmus.engines))
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="open", max_retries=0)
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=6, temperature=0)
        want, _ = tiny_chat.expected([{"role": "user", "content": "Hello there"}], max_tokens=6)
        assert r.choices[0].message.content == want
    finally:
        live.stop(s)
        session.close()
