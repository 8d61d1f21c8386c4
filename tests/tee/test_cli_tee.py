"""`isthmus keygen | seal | attest | verify | chat --sealed`, as a model owner, an operator and a third
party use them. Fast tests call the CLI's entry point in-process with ISTHMUS_HOME in a temp folder;
the slow test runs real processes on the default model and scans every file they wrote."""

import json
import os
import subprocess
import sys

import pytest

from isthmus.cli import main
from cli_runner import run, one_line_error  # tests/support




def test_help_lists_the_tee_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("keygen", "seal", "attest", "verify"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "--sealed" in capsys.readouterr().out


def test_owner_operator_and_verifier_end_to_end(home, capsys, chat_gguf):
    rc, out, _ = run(capsys, "keygen", "-o", "owner.key")
    assert rc == 0 and "public key" in out and oct((home / "owner.key").stat().st_mode)[-3:] == "600"
    rc, out, _ = run(capsys, "seal", chat_gguf, "--tenant", "acme", "--owner-key", "owner.key", "-o", "m.isth",
                     "--target", "reference", "--chunk-size", "8192", "--policy-out", "policy.json")
    assert rc == 0 and "sealed acme/tiny-chat version 1" in out, out
    policy = json.loads((home / "policy.json").read_text())
    assert policy["tenant"] == "acme" and len(policy["pcrs"]) == 1

    nonce = "ab" * 16
    rc, out, _ = run(capsys, "attest", "--nonce", nonce, "--sealed", "m.isth", "--target", "reference",
                     "-o", "report.json")
    assert rc == 0
    rc, out, _ = run(capsys, "verify", "report.json", "--policy", "policy.json", "--nonce", nonce)
    assert rc == 0 and out.startswith("verified:"), out
    rc, _, err = run(capsys, "verify", "report.json", "--policy", "policy.json", "--nonce", "cd" * 16)
    one_line_error(rc, err, "nonce")
    run(capsys, "attest", "--nonce", nonce, "--target", "reference", "-o", "bare.json")    # no program measured
    rc, _, err = run(capsys, "verify", "bare.json", "--policy", "policy.json")
    one_line_error(rc, err, "allow-list")

    args = ["--target", "reference", "--max-tokens", "10", "--temperature", "0.8", "--seed", "3"]
    rc, sealed_out, err = run(capsys, "chat", "Hello there", "--sealed", "m.isth", "--verbose", *args)
    assert rc == 0 and "unseal duration" in err, err
    rc, plain_out, _ = run(capsys, "chat", "Hello there", "--model", chat_gguf, *args)
    assert rc == 0 and sealed_out == plain_out and sealed_out.strip()

    rc, out, _ = run(capsys, "seal", chat_gguf, "--tenant", "acme", "--owner-key", "owner.key", "-o", "m2.isth",
                     "--target", "reference")
    assert rc == 0 and "version 2" in out
    rc, _, err = run(capsys, "chat", "hi", "--sealed", "m.isth", *args)
    one_line_error(rc, err, "rollback")


def test_mistakes_are_one_line(home, capsys, chat_gguf):
    one_line_error(*run(capsys, "keygen")[::2], "--output")
    run(capsys, "keygen", "-o", "k")
    one_line_error(*run(capsys, "keygen", "-o", "k")[::2], "already exists")
    (home / "not-a-key").write_text("hello")
    one_line_error(*run(capsys, "seal", chat_gguf, "--tenant", "acme", "--owner-key", "not-a-key", "-o", "x.isth")[::2],
                   "not-a-key")
    one_line_error(*run(capsys, "seal", chat_gguf, "--tenant", "a b", "--owner-key", "k", "-o", "x.isth")[::2],
                   "tenant")
    one_line_error(*run(capsys, "seal", "nope.gguf", "--tenant", "acme", "--owner-key", "k", "-o", "x.isth")[::2],
                   "nope.gguf")
    one_line_error(*run(capsys, "attest", "--nonce", "xyz")[::2], "--nonce")
    one_line_error(*run(capsys, "verify", "missing.json", "--policy", "p.json")[::2], "missing.json")
    one_line_error(*run(capsys, "chat", "hi", "--sealed", "missing.isth")[::2], "missing.isth")
    (home / "junk.isth").write_bytes(os.urandom(500))
    one_line_error(*run(capsys, "chat", "hi", "--sealed", "junk.isth")[::2], "not a sealed isthmus package")
    assert not (home / "x.isth").exists() and not (home / "x.isth.part").exists()


def test_a_package_from_another_key_release_service_gets_no_key(home, capsys, chat_gguf, monkeypatch):
    run(capsys, "keygen", "-o", "k")
    assert run(capsys, "seal", chat_gguf, "--tenant", "acme", "--owner-key", "k", "-o", "m.isth",
               "--target", "reference")[0] == 0
    monkeypatch.setenv("ISTHMUS_HOME", str(home / "elsewhere"))
    one_line_error(*run(capsys, "chat", "hi", "--sealed", "m.isth", "--target", "reference")[::2], "not registered")


# -- the default model, real processes, every written file scanned -----------------------------------

def isthmus(*args, env):
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


@pytest.mark.slow
def test_no_file_isthmus_wrote_holds_plaintext_weights_or_conversation(tmp_path, default_model_path, default_exe,
                                                                      scan):
    import isthmus as api
    from isthmus.compiler.frontends.gguf import read_gguf

    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for d in (work, home, tmp):
        d.mkdir()
    env = {**os.environ, "ISTHMUS_HOME": str(home), "TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp)}
    env.pop("ISTHMUS_DUMP", None)
    prompt = ("My account number is 4417-2230-9981 and my mother's maiden name is Quillfeather; "
              "please remember both and tell me what the capital of France is.")
    isthmus("keygen", "-o", work / "owner.key", env=env)
    isthmus("seal", default_model_path, "--tenant", "acme", "--owner-key", work / "owner.key",
            "-o", work / "model.isth", "--target", "reference", env=env)
    out, err = isthmus("chat", prompt, "--sealed", work / "model.isth", "--target", "reference",
                       "--max-tokens", "24", "--verbose", env=env)
    assert out.endswith("\n")
    reply = out[:-1]                   # the CLI ends the reply with one newline

    # the same tokens as the unsealed model
    expected = "".join(api.chat(default_exe, [{"role": "user", "content": prompt}], max_tokens=24))
    assert reply == expected

    # every file written under ISTHMUS_HOME, TMPDIR and the working folder
    files = [p for d in (work, home, tmp) for p in d.rglob("*") if p.is_file() and p.name != "owner.key"]
    assert any(p.suffix == ".isth" for p in files) and any(p.name == "kms.sqlite3" for p in files)
    gguf = read_gguf(default_model_path)
    weights = default_model_path.read_bytes()[gguf.data_offset:]
    conversation = [prompt.encode(), reply.encode()]
    leaks = scan(files, [weights, *conversation])
    assert leaks == [], leaks[:5]
