"""The hash-chained audit log: what is logged, and `isthmus audit verify` naming the line of a
tampered, deleted or reordered entry."""

import json

import pytest

from isthmus.cli import main
from isthmus.errors import ReplayError
from isthmus.runtime.tee.audit import AuditError, AuditLog, verify
from isthmus.runtime.tee.enclave import EnclaveSession
from isthmus.runtime.tee.keyrelease import key_request


@pytest.fixture
def log(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.record("attestation", nonce=f"{i:02x}", tenant="acme")
    return log


def lines(log):
    return log.path.read_text().splitlines(keepends=True)


def rewrite(log, new_lines):
    log.path.write_text("".join(new_lines))


def test_an_intact_log_verifies_and_chains(log):
    result = verify(log.path)
    assert result.entries == 5 and result.head_file
    entries = [json.loads(x) for x in lines(log)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert verify(log.path, head=entries[2]["hash"]).head == entries[-1]["hash"]
    log.record("erasure", tenant="acme", subject="ab" * 32)           # appends continue the chain
    assert verify(log.path).entries == 6


def test_a_tampered_entry_is_named(log):
    text = lines(log)
    text[2] = text[2].replace('"tenant":"acme"', '"tenant":"evil"')
    rewrite(log, text)
    with pytest.raises(AuditError, match="line 3: entry 3 was altered"):
        verify(log.path)


def test_a_rehashed_forgery_breaks_the_next_link(log):
    from isthmus.runtime.tee.audit import entry_hash
    from isthmus.runtime.tee.crypto import canonical
    text = lines(log)
    entry = json.loads(text[1])
    entry["data"]["tenant"] = "evil"
    entry["hash"] = entry_hash(entry)
    text[1] = canonical(entry).decode() + "\n"
    rewrite(log, text)
    with pytest.raises(AuditError, match=r"line 3: does not follow the entry before it \(line 2"):
        verify(log.path)


def test_deleted_and_reordered_entries_are_named(log):
    text = lines(log)
    rewrite(log, text[:1] + text[2:])
    with pytest.raises(AuditError, match="line 2: holds entry 3 where entry 2 belongs"):
        verify(log.path)
    rewrite(log, [text[0], text[1], text[3], text[2], text[4]])
    with pytest.raises(AuditError, match="line 3: holds entry 4 where entry 3 belongs"):
        verify(log.path)


def test_a_cut_tail_is_caught_by_the_head(log):
    text = lines(log)
    head = json.loads(text[-1])["hash"]
    rewrite(log, text[:3])
    with pytest.raises(AuditError, match="entries 4..5 were deleted"):
        verify(log.path)
    log.head_path.unlink()                              # the head file went too: a kept head still catches it
    assert verify(log.path).entries == 3 and not verify(log.path).head_file
    with pytest.raises(AuditError, match="no entry has the hash"):
        verify(log.path, head=head)
    rewrite(log, text[:3] + [text[3][:40]])
    with pytest.raises(AuditError, match="line 4: a partial entry"):
        verify(log.path)
    with pytest.raises(AuditError, match="partial"):
        log.record("attestation")                       # no entry is chained onto a damaged log


def test_key_releases_refusals_and_attestations_are_logged(tee, sealed, tmp_path):
    tee.kms.audit = audit = AuditLog(tmp_path / "audit" / "audit.jsonl")
    session = EnclaveSession(tee.platform, target="reference", audit=audit)
    session.load(sealed.path, tee.kms)
    raw = session.report(b"n" * 16, key_request(sealed.pkg))
    tee.kms.release(raw, sealed.pkg.signed_bytes())
    with pytest.raises(ReplayError):
        tee.kms.release(raw, sealed.pkg.signed_bytes())
    session.report(b"v" * 16)
    session.close()
    entries = [json.loads(x) for x in audit.path.read_text().splitlines()]
    got = [(e["event"], e["data"].get("purpose") or e["data"].get("outcome")) for e in entries]
    assert got == [("attestation", "key-release"), ("key-release", "released"),
                   ("attestation", "key-release"), ("key-release", "released"),
                   ("key-release", "refused"), ("attestation", "attestation")]
    assert entries[4]["data"]["reason"] == "ReplayError"
    assert entries[1]["data"]["tenant"] == "acme" and entries[1]["data"]["version"] == sealed.pkg.header.version
    assert verify(audit.path).entries == 6


def test_isthmus_audit_verify(tmp_path, monkeypatch, capsys, chat_gguf):
    """The real CLI: seal and chat write the home's log; verify passes, then names a tampered line."""
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "-o", "k"]) == 0
    assert main(["seal", str(chat_gguf), "--tenant", "acme", "--owner-key", "k", "-o", "m.isth",
                 "--target", "reference"]) == 0
    assert main(["chat", "hi", "--sealed", "m.isth", "--target", "reference", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "3 entries, chain intact, ends where its head file says" in out, out
    path = tmp_path / "home" / "audit" / "audit.jsonl"
    events = [json.loads(x)["event"] for x in path.read_text().splitlines()]
    assert events == ["package-registration", "attestation", "key-release"]
    text = path.read_text().splitlines(keepends=True)
    path.write_text(text[0] + text[2])
    assert main(["audit", "verify", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: holds entry 3 where entry 2 belongs" in err[0], err
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 2
    assert "no audit log there" in capsys.readouterr().err
    assert main(["audit", "verify", "--head", "xyz"]) == 2
    assert "--head" in capsys.readouterr().err
