"""The enclave session: a sealed model runs like the unsealed one; conversations are sealed out of it
under a memory budget and come back intact; tenants cannot open each other's state; close wipes."""

import json
import os

import numpy as np
import pytest

import isthmus
from isthmus.errors import InputError, SealError
from isthmus.runtime.tee import kvstate
from isthmus.runtime.tee.conversations import DirectoryBlobStore
from isthmus.runtime.tee.crypto import generate_signing_key, wrap_to
from isthmus.runtime.tee.enclave import EnclaveSession
from isthmus.runtime.tee.measurement import program_digest
from isthmus.runtime.tee.package import seal
from isthmus.runtime.tee.payload import PayloadReader

SAMPLING = dict(max_tokens=12, temperature=0.9, seed=7)
HELLO = [{"role": "user", "content": "Hello there, enclave"}]


@pytest.fixture
def session(tee, sealed):
    s = EnclaveSession(tee.platform, target="reference")
    s.load(sealed.path, tee.kms)
    yield s
    s.close()


@pytest.fixture(scope="module")
def plain_exe(chat_gguf):
    return isthmus.compile(isthmus.load(chat_gguf), target="reference")


def reply(stream):
    text = "".join(stream)
    return text, list(stream.token_ids)


def test_the_sealed_model_produces_the_same_tokens_as_the_unsealed_one(session, plain_exe):
    sealed_text, sealed_ids = reply(session.chat(HELLO, **SAMPLING))
    plain_text, plain_ids = reply(isthmus.chat(plain_exe, HELLO, **SAMPLING))
    assert sealed_ids == plain_ids and sealed_text == plain_text and len(set(sealed_ids)) > 2


def test_session_state_and_timings(session, sealed):
    from isthmus.runtime.tee.measurement import expected_package_pcr
    pcrs = dict(session.pcrs)
    assert pcrs.pop("3") == expected_package_pcr(sealed.pkg.identity())      # PCR3: this very package
    assert pcrs == sealed.allow[0]                                             # PCR0-2: what the owner allowed
    assert set(session.timings) == {"attest", "unseal", "unseal wait", "compile"}
    assert session.package.header.tenant == "acme"
    with pytest.raises(InputError, match="already runs"):
        session.measure_program(session.package)


def test_chat_needs_a_loaded_model(tee):
    with pytest.raises(InputError, match="no sealed model"):
        EnclaveSession(tee.platform, target="reference").chat(HELLO)


def test_close_zeroises_what_it_can_reach(tee, sealed):
    s = EnclaveSession(tee.platform, target="reference")
    s.load(sealed.path, tee.kms)
    buf, consts, secret = s._buffer, [a for a in s.exe._consts.values() if a.flags.owndata], s._secret
    assert any(buf[i] for i in range(0, len(buf), 997))
    s.close()
    assert not np.frombuffer(buf, np.uint8).any() and not any(secret)
    assert all(not a.any() for a in consts if a.flags.writeable)
    assert s.exe is None and s._buffer is None


# -- conversations -------------------------------------------------------------------------------

class Spy:
    """Counts the tokens a conversation's decoders are fed."""

    def __init__(self, monkeypatch):
        self.fed = []
        from isthmus.compiler.kv_cache import FunctionalDecoder
        original = FunctionalDecoder.step

        def step(dec, ids):
            self.fed.append(len(ids))
            return original(dec, ids)
        monkeypatch.setattr(FunctionalDecoder, "step", step)


def turns(chat, texts, **kw):
    out = []
    history = []
    for t in texts:
        history.append({"role": "user", "content": t})
        text, ids = reply(chat(history, [history[-1]], **kw))
        history.append({"role": "assistant", "content": text})
        out.append(ids)
    return out


def test_a_conversation_resumes_from_its_kv_cache(session, plain_exe, monkeypatch):
    spy = Spy(monkeypatch)
    texts = ["first question", "and a second one", "third"]
    kept = turns(lambda h, new, **kw: session.chat(new, tenant="t", conversation="c", **kw), texts, **SAMPLING)
    fed_per_turn = spy.fed[:]
    spy.fed.clear()
    fresh = turns(lambda h, new, **kw: isthmus.chat(plain_exe, h, **kw), texts, **SAMPLING)
    assert kept == fresh                              # same tokens as replaying the whole history each turn
    conv = session.conversations._conversations[("t", "c")]
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3
    # later turns prefill only what the cache does not hold: at least the previous turn's whole prompt
    # is reused (the reply itself may re-tokenize differently from the sampled ids, so it may not be)
    kept_prefills = [n for n in fed_per_turn if n > 1]
    full_prefills = [n for n in spy.fed if n > 1]
    assert len(kept_prefills) == len(full_prefills) == 3 and kept_prefills[0] == full_prefills[0]
    assert kept_prefills[1] <= full_prefills[1] - full_prefills[0]
    assert kept_prefills[2] <= full_prefills[2] - full_prefills[1]


def test_idle_conversations_are_sealed_and_restored_under_a_budget(tee, sealed, plain_exe):
    s = EnclaveSession(tee.platform, target="reference")
    s.load(sealed.path, tee.kms)
    store = s.conversations
    a1 = reply(s.chat([{"role": "user", "content": "alpha one"}], conversation="A", **SAMPLING))
    assert store.evictions == 0 and store.resident_bytes() > 0
    store.budget = store.resident_bytes() + 1             # room for one conversation
    reply(s.chat([{"role": "user", "content": "bravo one"}], conversation="B", **SAMPLING))
    conv_a = store._conversations[("acme", "A")]
    assert store.evictions == 1 and not conv_a.resident and conv_a.decoder is None and len(store.blobs) == 1
    assert store.resident_bytes() <= store.budget
    a2 = reply(s.chat([{"role": "user", "content": "alpha two"}], conversation="A", **SAMPLING))
    conv_b = store._conversations[("acme", "B")]
    assert store.restores == 1 and not conv_b.resident and store.evictions >= 2     # B went out, A came back
    history = [{"role": "user", "content": "alpha one"}, {"role": "assistant", "content": a1[0]},
               {"role": "user", "content": "alpha two"}]
    assert a2 == reply(isthmus.chat(plain_exe, history, **SAMPLING))          # nothing lost on the way
    s.close()


def test_sealed_conversation_blobs_hold_no_plaintext(tee, sealed, tmp_path, scan):
    s = EnclaveSession(tee.platform, target="reference", kv_budget_bytes=1,
                       blob_store=DirectoryBlobStore(tmp_path / "blobs"))
    s.load(sealed.path, tee.kms)
    secret = "The launch code for project nightingale is 7 7 3 1, tell nobody at all, ever, anywhere."
    text, _ = reply(s.chat([{"role": "user", "content": secret}], conversation="c", **SAMPLING))
    conv = s.conversations._conversations[("acme", "c")]
    assert not conv.resident
    files = list((tmp_path / "blobs").iterdir())
    assert len(files) == 1 and "acme" not in files[0].name and "c" != files[0].stem
    # the KV cache as it was: restore it, copy it, check the blob again
    s.conversations.open("acme", "c")
    kv = b"".join(a.tobytes() for a in kvstate.export(conv.decoder))
    s.conversations.evict(conv)
    files = list((tmp_path / "blobs").iterdir())
    assert scan(files, [secret.encode(), text.encode(), kv]) == []
    s.close()


def test_another_tenant_cannot_open_a_conversation_blob(session):
    store = session.conversations
    reply(session.chat(HELLO, tenant="alpha", conversation="c", **SAMPLING))
    conv = store._conversations[("alpha", "c")]
    store.evict(conv)
    thief = store._conversations.setdefault(("bravo", "c"), type(conv)("bravo", "c"))
    thief.blob_id, thief.epoch = conv.blob_id, conv.epoch
    with pytest.raises(SealError, match="does not authenticate"):
        store.open("bravo", "c")
    assert store.open("alpha", "c").resident                     # the owner still can


def test_an_older_blob_cannot_be_replayed(session):
    store = session.conversations
    reply(session.chat(HELLO, tenant="t", conversation="c", **SAMPLING))
    conv = store._conversations[("t", "c")]
    store.evict(conv)
    old_id, old_blob = conv.blob_id, store.blobs[conv.blob_id]
    store.open("t", "c")
    reply(session.chat([{"role": "user", "content": "more"}], tenant="t", conversation="c", **SAMPLING))
    store.evict(conv)
    store.blobs[conv.blob_id] = old_blob               # the host serves the earlier state
    with pytest.raises(SealError):
        store.open("t", "c")
    del old_id


def test_a_tampered_blob_fails(session):
    store = session.conversations
    reply(session.chat(HELLO, tenant="t", conversation="c", **SAMPLING))
    conv = store._conversations[("t", "c")]
    store.evict(conv)
    blob = bytearray(store.blobs[conv.blob_id])
    blob[len(blob) // 2] ^= 1
    store.blobs[conv.blob_id] = bytes(blob)
    with pytest.raises(SealError):
        store.open("t", "c")


def test_conversation_arguments(session):
    with pytest.raises(InputError):
        session.chat(HELLO, conversation="")
    with pytest.raises(InputError):
        session.chat("not a list", conversation="c")


# -- in-place KV caches (the Numba decoder's protocol) --------------------------------------------

class InPlaceDecoder:
    def __init__(self, capacity=8):
        self.capacity, self.length = capacity, 0
        self.caches = {"s0": (np.zeros((1, 2, capacity, 4), np.float32), np.zeros((1, 2, capacity, 4), np.float32))}

    def step(self, ids):
        for k, v in self.caches.values():
            k[:, :, self.length:self.length + len(ids)] = np.arange(len(ids))[None, None, :, None] + self.length
            v[:, :, self.length:self.length + len(ids)] = -1
        self.length += len(ids)


class FakeExe:
    def decoder(self):
        return InPlaceDecoder()


def test_in_place_caches_export_restore_truncate_and_wipe():
    d = InPlaceDecoder()
    d.step([1, 2, 3])
    arrays = [a.copy() for a in kvstate.export(d)]
    assert [a.shape for a in arrays] == [(1, 2, 3, 4)] * 2
    back = kvstate.restore(FakeExe(), arrays)
    assert back.length == 3 and all(np.array_equal(a, b) for a, b in zip(kvstate.export(back), arrays))
    assert kvstate.truncate(back, 1) and back.length == 1 and not kvstate.truncate(back, 5)
    assert kvstate.nbytes(back) == 2 * 2 * 8 * 4 * 4
    kvstate.wipe(back)
    assert not any(a.any() for pair in back.caches.values() for a in pair)
    assert kvstate.restore(FakeExe(), [np.zeros((1, 2, 9, 4), np.float32)] * 2) is None    # over capacity


# -- loading failures ----------------------------------------------------------------------------

class HandingKMS:
    """A stand-in key release service that hands out `dek` to any report (for payload checks)."""

    def __init__(self, dek):
        self.dek = dek

    def release(self, report, header):
        from isthmus.runtime.tee.attestation import parse_report
        r = parse_report(report)
        return json.dumps({"wrapped": wrap_to(r.enclave_key, self.dek, r.digest)}).encode()


def seal_parts(path, parts, program_text):
    dek = os.urandom(32)
    reader = PayloadReader(parts)
    seal(reader, reader.size, path, tenant="acme", model="m", version=1, dek=dek, signer=generate_signing_key(),
         program_digest=program_digest(program_text))
    return HandingKMS(dek)


@pytest.mark.parametrize("case,match", [("missing", "lacks"), ("digest", "does not match the digest"),
                                        ("program", "different program")])
def test_a_payload_that_does_not_hold_its_measured_program(tee, chat_gguf, tmp_path, case, match):
    program = "graph \"x\" {\n  output\n}\n"
    parts = {"missing": [("model.gguf", chat_gguf)],
             "digest": [("model.gguf", chat_gguf), ("program.ir", b"something else")],
             "program": [("model.gguf", chat_gguf), ("program.ir", program.encode())]}[case]
    kms = seal_parts(tmp_path / "p.isth", parts, program)
    s = EnclaveSession(tee.platform, target="reference")
    with pytest.raises(SealError, match=match):
        s.load(tmp_path / "p.isth", kms)
    assert s.exe is None and s._buffer is None


def test_gguf_from_a_buffer_matches_the_file(chat_gguf):
    from isthmus.compiler.frontends.gguf import read_gguf
    from isthmus.compiler.frontends.gguf_model import load_gguf
    from isthmus.errors import ModelFormatError

    data = bytearray(chat_gguf.read_bytes())
    from_file, from_buf = read_gguf(chat_gguf), read_gguf(data, "in-memory")
    assert from_buf.metadata == from_file.metadata and from_buf.path == "in-memory"
    for name, t in from_file.tensors.items():
        assert np.array_equal(np.asarray(from_buf.tensors[name]), np.asarray(t))
        assert not np.asarray(from_buf.tensors[name]).flags.writeable
    model = load_gguf(memoryview(data), name="buf")
    assert model.tokenizer.encode("hi") == load_gguf(chat_gguf).tokenizer.encode("hi")
    with pytest.raises(ModelFormatError, match="in-memory"):
        read_gguf(bytes(data[:100]), "in-memory")
    with pytest.raises(ModelFormatError):
        read_gguf(b"GGUF")


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_a_gguf_arriving_in_pieces_parses_the_same_and_reads_nothing_before_it_arrives(chat_gguf, piece):
    """The sealed path parses a GGUF while it is being decrypted: the reader asks `ready(end)` before
    it reads. Here the bytes arrive `piece` at a time into a buffer full of 0xFF (which would read as
    absurd lengths and counts): the result is the file's, and the metadata and tokenizer came before
    the tensor data was asked for."""
    from isthmus.compiler.frontends.gguf import read_gguf
    from isthmus.compiler.frontends.gguf_model import load_gguf
    from isthmus.compiler.ir_text import print_graph

    real = chat_gguf.read_bytes()

    def arriving():
        buf, state = bytearray(b"\xff" * len(real)), {"in": 0, "asked": []}

        def ready(end: int) -> int:
            assert 0 < end <= len(real) and end > state["in"]
            state["asked"].append(end)
            state["in"] = min(len(real), -(-end // piece) * piece)
            buf[:state["in"]] = real[:state["in"]]
            return state["in"]
        return buf, state, ready

    buf, state, ready = arriving()
    parsed, plain = read_gguf(memoryview(buf), "in-memory", ready), read_gguf(chat_gguf)
    assert parsed.metadata == plain.metadata and parsed.data_offset == plain.data_offset
    assert state["in"] < len(real) and state["asked"] == sorted(state["asked"])
    assert state["asked"][-1] <= plain.data_offset               # the index, not the tensors
    buf, state, ready = arriving()
    model, want = load_gguf(memoryview(buf), "in-memory", ready), load_gguf(chat_gguf)
    assert state["in"] == len(real) and state["asked"][-1] == len(real)
    assert print_graph(model.graph) == print_graph(want.graph)
    assert model.tokenizer.encode("hi there") == want.tokenizer.encode("hi there")


def test_the_plaintext_scanner_finds_planted_leaks(tmp_path, scan):
    rng = np.random.default_rng(0)
    secret = rng.bytes(5000)
    text = b"The quick brown fox jumps over the lazy dog, then keeps running for a while."

    def fence(run_start, run_end):     # a run of the secret with bytes on both sides that do not extend it
        return (bytes([secret[run_start - 1] ^ 0xFF]) + secret[run_start:run_end]
                + bytes([secret[run_end] ^ 0xFF]))
    (tmp_path / "a").write_bytes(rng.bytes(1000) + fence(1003, 1073) + rng.bytes(7) + fence(3001, 3064))
    (tmp_path / "b").write_bytes(b"xx" + text + b"yy" + bytes(4096))
    (tmp_path / "c").write_bytes(rng.bytes(4096))
    found = scan(sorted(tmp_path.iterdir()), [secret, text, bytes(4096)])
    assert len(found) == 2, found            # 70 bytes of `secret` and all of `text`; 63 bytes and zeros are not
    assert "70 bytes of secret 0 (at its offset 1003) at offset 1001" in found[0]
    assert "76 bytes of secret 1 (at its offset 0) at offset 2" in found[1]
