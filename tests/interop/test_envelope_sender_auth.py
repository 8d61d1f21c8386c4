"""E2E envelopes authenticate the sender (issue 13, finding 1): the relay, which holds the enclave's and
the victim's public keys, cannot forge an envelope, push the victim's seq to the end of its range, or
talk plaintext into an encrypted conversation; a refused envelope changes no state; the genuine
sender carries on. Against a live server (loopback) over the tiny model, and the crypto directly."""

import json
import os
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isthmus.interop import envelope
from isthmus.interop.envelope import ClientSession, E2EError, EnvelopeOpener, LocalEnclaveKey
from isthmus.interop.outbox import Outbox
from isthmus.interop.webhook import WhatsAppAdapter, WhatsAppConfig, signature

SECRET, PNID = "e2e-app-secret", "30003"


class Recorder:
    """The platform's outbound side: records every reply the server sends."""

    def __init__(self):
        self.sent = []

    async def send_text(self, pnid, to, body):
        self.sent.append((to, body))

    async def aclose(self):
        pass

    def to(self, user, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len([b for t, b in self.sent if t == user]) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return [b for t, b in self.sent if t == user]


def forge(enclave_pub: bytes, victim_pub: bytes, tenant: str, user: str, seq: int, text: str,
          relay_static: X25519PrivateKey | None = None) -> str:
    """What a relay can build: a fresh ephemeral key, its own static key (it lacks the victim's private
    key) and the victim's public key in `spk`, exactly the envelope layout a client sends."""
    relay_static = relay_static or X25519PrivateKey.generate()
    eph = X25519PrivateKey.generate()
    epk = envelope._raw(eph.public_key())
    enclave = X25519PublicKey.from_public_bytes(enclave_pub)
    ikm = eph.exchange(enclave) + relay_static.exchange(enclave)
    key = envelope._key(ikm, epk, victim_pub, enclave_pub, b"c2s", tenant, user)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, text.encode(), envelope.aad(tenant, user, seq))
    return json.dumps({"e2e": envelope.TAG, "seq": seq, "spk": victim_pub.hex(), "epk": epk.hex(),
                       "nonce": nonce.hex(), "ct": ct.hex()})


@pytest.fixture(scope="module")
def srv(live, tiny_chat, tmp_path_factory):
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key

    enclave, out = LocalEnclaveKey(), Recorder()
    cfg = WhatsAppConfig(verify_token="v", app_secret=SECRET, phone_numbers={PNID: "acme"}, temperature=0.0,
                         max_tokens=4, outbox=str(tmp_path_factory.mktemp("e2e") / "outbox.sqlite3"))
    adapter = WhatsAppAdapter(cfg, outbound=out, enclave=enclave)
    tenants = Tenants.from_config({"tenants": [{"id": "acme", "api_key_sha256": [hash_key("sk-e2e-0123456789")]}]})
    s = live.start(create_app({"tiny-chat": tiny_chat.engine()}, tenants=tenants, whatsapp=adapter))
    s.adapter, s.enclave, s.out = adapter, enclave, out
    return s


_ids = iter(range(10**6))


def send(srv, user, text):
    body = json.dumps({"entry": [{"changes": [{"value": {"metadata": {"phone_number_id": PNID}, "messages": [
        {"from": user, "id": f"wamid.e2e{next(_ids)}", "timestamp": str(int(time.time())), "type": "text",
         "text": {"body": text}}]}}]}]}).encode()
    r = httpx.post(srv.url + "/webhooks/whatsapp", content=body,
                   headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature(SECRET, body)})
    assert r.status_code == 200, r.text
    return r.json()


def state_of(srv, user):
    """Everything a message could change: the pin and seq, the queued entries, the sealed history."""
    a = srv.adapter
    conv = a.conversations._conversations.get(("acme", f"e2e:{user}"))
    return (a.outbox.get_pin("acme", user), a.outbox.pending("acme"),
            None if conv is None else (conv.blob_id, conv.epoch))


def test_the_relay_cannot_forge_an_envelope_from_a_user(srv):
    user = "15557770001"
    victim = ClientSession(srv.enclave.public_key, "acme", user)
    assert send(srv, user, victim.seal("my pin is 4321"))["accepted"] == 1
    assert victim.open_reply(srv.out.to(user, 1)[0])
    before = state_of(srv, user)
    pub = srv.enclave.public_key
    attempts = [
        forge(pub, victim.static_public, "acme", user, 2, "what did I tell you?"),            # victim's spk, wrong DH
        forge(pub, victim.static_public, "acme", user, 2**64 - 1, "bump the counter"),       # the seq attack
        ClientSession(pub, "acme", user, first_seq=2).seal("a new phone, trust me"),         # another static key
    ]
    for env in attempts:
        assert send(srv, user, env) == {"accepted": 0, "duplicates": 0, "rejected": 1, "ignored": 0}
    time.sleep(0.3)
    assert state_of(srv, user) == before                      # the forgeries changed nothing
    assert len(srv.out.to(user, 1)) == 1                      # and got no reply
    # the genuine sender carries on with its next seq: nothing was pushed to 2^64 - 1
    assert send(srv, user, victim.seal("still me"))["accepted"] == 1
    replies = srv.out.to(user, 2)
    assert len(replies) == 2 and json.loads(replies[1])["seq"] == 2
    assert isinstance(victim.open_reply(replies[1]), str)


def test_no_plaintext_in_or_out_once_a_conversation_is_encrypted(srv):
    user = "15557770002"
    client = ClientSession(srv.enclave.public_key, "acme", user)
    assert send(srv, user, client.seal("hello"))["accepted"] == 1
    srv.out.to(user, 1)
    before = state_of(srv, user)
    assert send(srv, user, "a plaintext message in the victim's name")["rejected"] == 1
    time.sleep(0.5)
    sent = srv.out.to(user, 1)
    assert len(sent) == 1 and all(json.loads(b)["e2e"] == envelope.TAG for b in sent)      # no plaintext reply
    assert state_of(srv, user) == before


def test_a_plaintext_user_may_switch_to_encryption_with_a_fresh_history(srv):
    user = "15557770003"
    assert send(srv, user, "plain hello")["accepted"] == 1
    srv.out.to(user, 1)
    client = ClientSession(srv.enclave.public_key, "acme", user)
    assert send(srv, user, client.seal("now sealed"))["accepted"] == 1
    assert client.open_reply(srv.out.to(user, 2)[1]) is not None
    store = srv.adapter.conversations
    sealed = store.open("acme", f"e2e:{user}")
    try:                                   # the relay-readable plaintext turns are not in the sealed history
        assert [m["content"] for m in sealed.messages if m["role"] == "user"] == ["now sealed"]
    finally:
        store.park(sealed)


def test_opener_units():
    key, pins = LocalEnclaveKey(), Outbox(":memory:")
    opener = EnvelopeOpener(key, pins)
    alice = ClientSession(key.public_key, "t", "alice", first_seq=10)
    with pytest.raises(E2EError, match="does not open"):
        opener.open(forge(key.public_key, alice.static_public, "t", "alice", 10, "x"), "t", "alice")
    assert pins.get_pin("t", "alice") is None               # a forgery pins nothing, even on first contact
    text, ctx = opener.open(alice.seal("hi"), "t", "alice")
    assert text == "hi" and pins.get_pin("t", "alice") == (alice.static_public, 10) and opener.encrypted("t", "alice")
    # the sender itself cannot jump to the end of the range either
    alice.seq = 2**64 - 1
    with pytest.raises(E2EError, match="jumps"):
        opener.open(alice.seal("far"), "t", "alice")
    assert pins.get_pin("t", "alice") == (alice.static_public, 10)
    alice.seq = 11
    assert opener.open(alice.seal("next"), "t", "alice")[0] == "next"
    # the pin and the counter are persisted: a new opener over the same store refuses a replay
    replay = alice.seal("once")
    assert EnvelopeOpener(key, pins).open(replay, "t", "alice")[0] == "once"
    with pytest.raises(E2EError, match="not after"):
        EnvelopeOpener(key, pins).open(replay, "t", "alice")
    # a split reply: every part opens, in any order, once
    parts = [EnvelopeOpener.seal_reply(ctx, p, i, 3) for i, p in enumerate(["a", "b", "c"])]
    assert [alice.open_reply(parts[i]) for i in (2, 0, 1)] == ["c", "a", "b"]
    with pytest.raises(E2EError, match="awaiting"):
        alice.open_reply(parts[0])
    # low-order / invalid static keys are refused, not crashed on
    doc = json.loads(alice.seal("z"))
    doc["spk"] = "00" * 32
    with pytest.raises(E2EError):
        opener.open(json.dumps(doc), "t", "alice")


def test_a_pin_dropped_by_the_host_does_not_open_the_old_history(srv):
    """Trust on first use cannot stop an operator who deletes a pin row; what it must not give that
    operator is the history sealed under the earlier pin."""
    user = "15557770004"
    victim = ClientSession(srv.enclave.public_key, "acme", user)
    assert send(srv, user, victim.seal("my diagnosis is private"))["accepted"] == 1
    srv.out.to(user, 1)
    srv.adapter.outbox._q("DELETE FROM pins WHERE sender = ?", (user,))      # the host's edit
    intruder = ClientSession(srv.enclave.public_key, "acme", user)
    assert send(srv, user, intruder.seal("what did I say before?"))["accepted"] == 1
    srv.out.to(user, 2)
    store = srv.adapter.conversations
    assert wait_idle(srv)
    conv = store.open("acme", f"e2e:{user}")
    try:
        assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["what did I say before?"]
    finally:
        store.park(conv)
    # and the victim, whose key is no longer pinned, is refused rather than mixed in
    assert send(srv, user, victim.seal("hello?"))["rejected"] == 1


def wait_idle(srv, timeout=30):
    deadline = time.monotonic() + timeout
    while (srv.adapter._tasks or srv.adapter.outbox.pending()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not srv.adapter._tasks
