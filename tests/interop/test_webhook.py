"""The WhatsApp-style webhook: handshake, signatures, de-duplication, e2e envelopes, replies posted
through the real outbound HTTP client to a fake platform on loopback."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from isthmus.interop.envelope import ClientSession, E2EError, EnvelopeOpener, LocalEnclaveKey
from isthmus.interop.webhook import GraphApiClient, WhatsAppAdapter, WhatsAppConfig, signature

SECRET, VERIFY, PNID, TOKEN = "app-secret-123", "verify-me", "10001", "graph-token"


class FakePlatform:
    """Records what the server posts to {base}/{phone_number_id}/messages."""

    def __init__(self):
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append({"path": self.path, "auth": self.headers.get("Authorization"), "json": json.loads(body)})
                out = json.dumps({"messaging_product": "whatsapp", "messages": [{"id": f"wamid.out{len(posts)}"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out.encode())

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v21.0"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.posts) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.posts


@pytest.fixture(scope="module")
def platform():
    p = FakePlatform()
    yield p
    p.httpd.shutdown()


@pytest.fixture(scope="module")
def wa(live, tiny_chat, platform, tmp_path_factory):
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key

    enclave = LocalEnclaveKey()
    cfg = WhatsAppConfig(verify_token=VERIFY, app_secret=SECRET, phone_numbers={PNID: "acme", "20002": "globex"},
                         graph_url=platform.url, access_token=TOKEN, temperature=0.0, max_tokens=8,
                         outbox=str(tmp_path_factory.mktemp("outbox") / "outbox.sqlite3"))
    adapter = WhatsAppAdapter(cfg, outbound=GraphApiClient(platform.url, TOKEN), enclave=enclave)
    tenants = Tenants.from_config({"tenants": [{"id": "acme", "api_key_sha256": [hash_key("sk-a-0123456789")]},
                                               {"id": "globex", "api_key_sha256": [hash_key("sk-g-0123456789")]}]})
    s = live.start(create_app({"tiny-chat": tiny_chat.engine()}, tenants=tenants, whatsapp=adapter))
    s.adapter, s.enclave, s.platform = adapter, enclave, platform
    return s


_ids = iter(range(10**6))


def notification(text, sender="15550001111", pnid=PNID, message_id=None, timestamp=None):
    message_id = message_id or f"wamid.in{next(_ids)}"
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    return {"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550000000", "phone_number_id": pnid},
        "contacts": [{"profile": {"name": "Ann"}, "wa_id": sender}],
        "messages": [{"from": sender, "id": message_id, "timestamp": timestamp, "type": "text",
                      "text": {"body": text}}]}}]}]}


def post(server, payload, secret=SECRET, raw=None, headers=None):
    body = raw if raw is not None else json.dumps(payload).encode()
    h = {"Content-Type": "application/json"}
    if secret is not None:
        h["X-Hub-Signature-256"] = signature(secret, body)
    return httpx.post(server.url + "/webhooks/whatsapp", content=body, headers={**h, **(headers or {})})


def test_verify_handshake(wa):
    url = wa.url + "/webhooks/whatsapp"
    r = httpx.get(url, params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"})
    assert r.status_code == 200 and r.text == "1158201444"
    for params in ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "x"},
                   {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "x"},
                   {"hub.mode": "subscribe", "hub.challenge": "x"}, {}):
        r = httpx.get(url, params=params)
        assert r.status_code == 403 and r.json()["error"]["code"] == "verify_failed"


def test_a_signed_message_delivered_twice_is_processed_once(wa, tiny_chat):
    before = len(wa.platform.posts)
    payload = notification("Hello there", sender="15550002222")
    r1, r2 = post(wa, payload), post(wa, payload)
    assert r1.status_code == r2.status_code == 200
    assert r1.json() == {"accepted": 1, "duplicates": 0, "rejected": 0, "ignored": 0}
    assert r2.json() == {"accepted": 0, "duplicates": 1, "rejected": 0, "ignored": 0}
    posts = wa.platform.wait_for(before + 1)
    time.sleep(0.3)
    assert len(wa.platform.posts) == before + 1          # one reply, not two
    out = posts[before]
    assert out["path"] == f"/v21.0/{PNID}/messages" and out["auth"] == f"Bearer {TOKEN}"
    assert out["json"]["to"] == "15550002222" and out["json"]["type"] == "text"
    want, _ = tiny_chat.expected([{"role": "user", "content": "Hello there"}], max_tokens=8)
    assert out["json"]["text"]["body"] == want


def test_tampered_body_and_missing_or_wrong_signature_are_rejected(wa):
    before = len(wa.platform.posts)
    body = json.dumps(notification("pay me")).encode()
    good = signature(SECRET, body)
    for raw, sig in ((body.replace(b"pay me", b"pay ME"), good),   # tampered after signing
                     (body, None),                                  # missing header
                     (body, signature("other-secret", body)),       # signed with the wrong secret
                     (body, good[:-1]), (body, "sha1=" + good[7:]), (body, "")):
        headers = {} if sig is None else {"X-Hub-Signature-256": sig}
        r = httpx.post(wa.url + "/webhooks/whatsapp", content=raw, headers={"Content-Type": "application/json", **headers})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"
    time.sleep(0.3)
    assert len(wa.platform.posts) == before


def test_signed_but_malformed_or_foreign_payloads(wa):
    assert post(wa, None, raw=b"{oops").status_code == 400
    assert post(wa, {"no": "entry"}).status_code == 400
    r = post(wa, notification("hi", pnid="99999"))                 # a number that no tenant owns
    assert r.status_code == 200 and r.json()["ignored"] == 1
    status_update = {"entry": [{"changes": [{"value": {"metadata": {"phone_number_id": PNID},
                                                       "statuses": [{"id": "wamid.x", "status": "read"}]}}]}]}
    assert post(wa, status_update).json() == {"accepted": 0, "duplicates": 0, "rejected": 0, "ignored": 0}


def test_an_encrypted_envelope_round_trips(wa, tiny_chat):
    before = len(wa.platform.posts)
    sender = "15550003333"
    client = ClientSession(wa.enclave.public_key, tenant="acme", conversation=sender)
    envelope = client.seal("Hello there")
    assert "Hello there" not in envelope
    r = post(wa, notification(envelope, sender=sender))
    assert r.json()["accepted"] == 1
    reply = wa.platform.wait_for(before + 1)[before]["json"]["text"]["body"]
    assert json.loads(reply)["e2e"] == "isthmus/2" and json.loads(reply)["seq"] == 1
    want, _ = tiny_chat.expected([{"role": "user", "content": "Hello there"}], max_tokens=8)
    assert client.open_reply(reply) == want


def test_replayed_reordered_and_moved_envelopes_are_rejected(wa):
    sender = "15550004444"
    client = ClientSession(wa.enclave.public_key, tenant="acme", conversation=sender, first_seq=5)
    first = client.seal("one")
    assert post(wa, notification(first, sender=sender)).json()["accepted"] == 1
    # the same envelope again, in a new platform message: a replay
    assert post(wa, notification(first, sender=sender)).json() == {"accepted": 0, "duplicates": 0, "rejected": 1, "ignored": 0}
    # an older seq after a newer one: reordering
    client.seq = 4
    assert post(wa, notification(client.seal("old"), sender=sender)).json()["rejected"] == 1
    # a valid envelope moved to another conversation or tenant does not open
    assert post(wa, notification(client.seal("moved"), sender="15550009999")).json()["rejected"] == 1
    globex = ClientSession(wa.enclave.public_key, tenant="acme", conversation=sender, first_seq=100,
                           static=client.static)
    assert post(wa, notification(globex.seal("x"), sender=sender, pnid="20002")).json()["rejected"] == 1
    # garbage that looks like an envelope
    assert post(wa, notification('{"e2e": "isthmus/2", "seq": 9, "epk": "zz"}', sender=sender)).json()["rejected"] == 1
    # an envelope of the old, sender-unauthenticated format
    assert post(wa, notification('{"e2e": "isthmus/1", "seq": 9, "epk": "00"}', sender=sender)).json()["rejected"] == 1


def test_conversations_keep_history_per_tenant(wa):
    adapter = wa.adapter
    before = len(wa.platform.posts)
    post(wa, notification("first", sender="15550005555"))
    wa.platform.wait_for(before + 1)
    post(wa, notification("second", sender="15550005555"))
    post(wa, notification("first", sender="15550005555", pnid="20002"))
    wa.platform.wait_for(before + 3)
    store = adapter.conversations                 # the enclave's store: sealed between turns
    acme = store.open("acme", "wa:15550005555")
    globex = store.open("globex", "wa:15550005555")
    assert [m["content"] for m in acme.messages if m["role"] == "user"] == ["first", "second"]
    assert [m["content"] for m in globex.messages if m["role"] == "user"] == ["first"]
    store.park(acme), store.park(globex)
    assert not acme.resident and not acme.messages and acme.blob_id in store.blobs


def test_envelope_crypto_units():
    key = LocalEnclaveKey()
    opener = EnvelopeOpener(key)
    c = ClientSession(key.public_key, "t", "c")
    env = c.seal("secret text")
    doc = json.loads(env)
    doc["ct"] = doc["ct"][:-2] + ("00" if doc["ct"][-2:] != "00" else "01")
    with pytest.raises(E2EError, match="does not open"):
        opener.open(json.dumps(doc), "t", "c")
    text, ctx = opener.open(env, "t", "c")        # the forgery did not advance the counter
    assert text == "secret text"
    assert c.open_reply(opener.seal_reply(ctx, "réponse 😀")) == "réponse 😀"
    with pytest.raises(E2EError, match="awaiting"):
        c.open_reply(opener.seal_reply(ctx, "again"))          # one reply per message
    with pytest.raises(E2EError):
        ClientSession(b"short", "t", "c")
