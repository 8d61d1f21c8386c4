"""The webhook's durability, limits and retention (issue 13, findings 5 and 10, and "conversation state
lives in the enclave"): a restart loses no accepted message, replays inside the window are dropped and
old notifications refused, sends are retried with backoff, long replies are split, webhook work counts
against the tenant's limits, and a user's conversations can be erased (the sealed blob and its key go).
Live servers on 127.0.0.1 over the tiny model; every wait is bounded."""

import json
import logging
import time

import httpx
import pytest

from isthmus.cli import main
from isthmus.interop.envelope import ClientSession, LocalEnclaveKey
from isthmus.interop.tenants import Tenants, hash_key
from isthmus.interop.webhook import RedactSecrets, WhatsAppAdapter, WhatsAppConfig, signature, split_text
from isthmus.errors import InputError, SealError

SECRET, PNID, ADMIN = "outbox-secret", "40004", "sk-admin-0123456789abcdef"


class Recorder:
    """The platform's send API: records replies; `fail` makes the next sends raise (platform down)."""

    def __init__(self, fail=0):
        self.sent, self.fail, self.calls = [], fail, 0

    async def send_text(self, pnid, to, body):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("platform unreachable")
        self.sent.append((to, body))

    async def aclose(self):
        pass

    def to(self, user, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.bodies(user)) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.bodies(user)

    def bodies(self, user):
        return [b for t, b in self.sent if t == user]


def tenants(**limits):
    return Tenants.from_config({"tenants": [{"id": "acme", "api_key_sha256": [hash_key("sk-acme-0123456789")],
                                             **limits},
                                            {"id": "globex", "api_key_sha256": [hash_key("sk-globex-0123456789")]}],
                                "admin": {"api_key_sha256": [hash_key(ADMIN)]}})


@pytest.fixture
def start(live, tiny_chat):
    running = []

    def _start(outbox, out, limits=None, enclave=None, **cfg):
        from isthmus.interop.app import create_app
        config = WhatsAppConfig(verify_token="verify-secret-token", app_secret=SECRET, phone_numbers={PNID: "acme"},
                                temperature=0.0, max_tokens=4, outbox=str(outbox), **cfg)
        adapter = WhatsAppAdapter(config, outbound=out, enclave=enclave)
        s = live.start(create_app({"tiny-chat": tiny_chat.engine()}, tenants=tenants(**(limits or {})),
                                  whatsapp=adapter))
        s.adapter, s.out = adapter, out
        running.append(s)
        return s

    def _stop(s):
        running.remove(s)
        live.stop(s)

    _start.stop = _stop
    yield _start
    for s in running:
        live.stop(s)


_ids = iter(range(10**6))


def body_of(*messages):
    """A notification with (user, text[, message id[, timestamp]]) messages."""
    out = []
    for m in messages:
        user, text = m[0], m[1]
        mid = m[2] if len(m) > 2 else f"wamid.ob{next(_ids)}"
        ts = m[3] if len(m) > 3 else int(time.time())
        out.append({"from": user, "id": mid, "timestamp": str(ts), "type": "text", "text": {"body": text}})
    return json.dumps({"entry": [{"changes": [{"value": {"metadata": {"phone_number_id": PNID},
                                                         "messages": out}}]}]}).encode()


def post(s, raw):
    return httpx.post(s.url + "/webhooks/whatsapp", content=raw, timeout=30,
                      headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature(SECRET, raw)})


def wait(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_a_restart_loses_no_accepted_message_and_replays_stay_dropped(start, tmp_path, tiny_chat):
    db = tmp_path / "outbox.sqlite3"
    # the platform is down, and the tenant may start one turn per ~1000 s: one reply is generated and
    # its send retried, the other message waits for the limit; then the server stops
    s1 = start(db, Recorder(fail=10**6), limits={"requests_per_second": 0.001, "burst": 1},
               retry_base_s=0.05, retry_max_s=0.1)
    raw = body_of(("15550100001", "remember the milk", "wamid.keep1"))
    assert post(s1, raw).json()["accepted"] == 1
    assert post(s1, body_of(("15550100011", "and the eggs"))).json()["accepted"] == 1
    assert wait(lambda: s1.out.calls >= 2)                       # generated once, send retried with backoff
    assert s1.adapter.outbox.pending() == 2
    start.stop(s1)
    want, _ = tiny_chat.expected([{"role": "user", "content": "remember the milk"}], max_tokens=4)
    for f in tmp_path.iterdir():                                 # the outbox holds no plaintext
        data = f.read_bytes()
        assert b"remember the milk" not in data and b"and the eggs" not in data, f
        assert len(want) < 4 or want.encode() not in data, f
    s2 = start(db, Recorder())                                   # same file, platform back up, no limit
    eggs, _ = tiny_chat.expected([{"role": "user", "content": "and the eggs"}], max_tokens=4)
    milk, _ = tiny_chat.expected([{"role": "user", "content": "remember the milk"}], max_tokens=4)
    assert s2.out.to("15550100001", 1) == [milk] and s2.out.to("15550100011", 1) == [eggs]
    assert post(s2, raw).json() == {"accepted": 0, "duplicates": 1, "rejected": 0, "ignored": 0}
    # a notification older than the de-duplication window is refused, not answered again
    old = body_of(("15550100001", "stale", "wamid.old", int(time.time()) - 8 * 86400))
    assert post(s2, old).json()["rejected"] == 1
    time.sleep(0.3)
    assert s2.out.bodies("15550100001") == [milk] and s2.adapter.outbox.pending() == 0


def test_dedup_ids_expire_after_the_window_only(tmp_path):
    from isthmus.interop.outbox import Outbox
    now = [1000.0]
    ob = Outbox(tmp_path / "o.sqlite3", window_s=100, clock=lambda: now[0])
    ob.remember("p", "m1")
    now[0] += 99
    ob.purge()
    assert ob.seen("p", "m1")
    now[0] += 2
    ob.purge()
    assert not ob.seen("p", "m1")
    ob.close()
    again = Outbox(tmp_path / "o.sqlite3")
    assert again.seen("p", "m1") is False
    with pytest.raises(InputError, match="in use by another server"):     # two servers would reply twice
        Outbox(tmp_path / "o.sqlite3")
    again.close()
    assert {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()} == {
        name: 0o600 for name in ("o.sqlite3", "o.sqlite3.key", "o.sqlite3.lock")}      # WAL checkpointed on close


def test_sends_are_retried_and_parts_already_sent_are_not_repeated(start, tmp_path):
    s = start(tmp_path / "o.sqlite3", Recorder(), retry_base_s=0.05, retry_max_s=0.2)
    long = ("word " * 1000).strip() + "!"               # 5,000 characters

    async def generate(state, tenant, messages):
        return long

    s.adapter._generate = generate
    s.out.fail = 0
    orig = s.out.send_text
    calls = []

    async def flaky(pnid, to, body):                    # the second part fails twice, then goes through
        calls.append(body)
        if len(calls) in (2, 3):
            raise ConnectionError("flaky")
        await orig(pnid, to, body)

    s.out.send_text = flaky
    assert post(s, body_of(("15550100002", "tell me a long story"))).json()["accepted"] == 1
    parts = s.out.to("15550100002", 2)
    assert len(parts) == 2 and all(len(p) <= 4096 for p in parts) and "".join(parts) == long
    assert calls.count(parts[0]) == 1                   # not re-sent by the retries
    assert wait(lambda: s.adapter.outbox.pending() == 0)


def test_a_long_sealed_reply_is_split_into_envelopes_that_fit(start, tmp_path):
    enclave = LocalEnclaveKey()
    s = start(tmp_path / "o.sqlite3", Recorder(), enclave=enclave)
    long = "é" * 2500 + "x" * 2500                     # 5,000 characters, 7,500 bytes

    async def generate(state, tenant, messages):
        return long

    s.adapter._generate = generate
    client = ClientSession(enclave.public_key, "acme", "15550100003")
    assert post(s, body_of(("15550100003", client.seal("go")))).json()["accepted"] == 1
    assert wait(lambda: s.adapter.outbox.pending() == 0)
    parts = s.out.bodies("15550100003")
    assert len(parts) >= 3 and all(len(p) <= 4096 for p in parts)
    assert "".join(client.open_reply(p) for p in parts) == long


def test_split_text_units():
    text = "a" * 5000
    assert [len(p) for p in split_text(text, 4096)] == [4096, 904]
    words = "hello world " * 500
    parts = split_text(words, 4096)
    assert "".join(parts) == words and all(p.endswith(" ") for p in parts[:-1])
    emoji = "😀" * 3000                                  # 2 UTF-16 units each
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in split_text(emoji, 4096))
    assert split_text("", 4096) == [""]


def test_webhook_work_counts_against_the_tenants_limits(start, tmp_path):
    # one request per ~1000 s, burst 1: a flood is queued, never answered past the limit, never lost
    s = start(tmp_path / "o.sqlite3", Recorder(), limits={"requests_per_second": 0.001, "burst": 1},
              max_pending_per_tenant=4)
    flood = body_of(*[("15550100004", f"message {i}") for i in range(6)])
    r = post(s, flood)
    assert r.status_code == 503 and r.json()["error"]["code"] == "webhook_backlog" and "Retry-After" in r.headers
    assert "2 message(s) deferred" in r.json()["error"]["message"]
    assert s.out.to("15550100004", 1) and len(s.out.bodies("15550100004")) == 1
    time.sleep(0.5)
    assert len(s.out.bodies("15550100004")) == 1 and s.adapter.outbox.pending("acme") == 3
    metrics = s.state.metrics.render()
    assert 'isthmus_rate_limited_total{tenant="acme"}' in metrics
    # the platform redelivers the same notification: the 4 accepted are duplicates, one more fits the
    # backlog (one entry was answered), the last still waits for the next redelivery
    r = post(s, flood)
    assert r.status_code == 503 and "1 message(s) deferred" in r.json()["error"]["message"]
    assert "(1 accepted)" in r.json()["error"]["message"] and s.adapter.outbox.pending("acme") == 4


def test_erasure_removes_the_sealed_history_and_its_key(start, tmp_path, monkeypatch, capsys):
    s = start(tmp_path / "o.sqlite3", Recorder())
    user = "15550100005"
    assert post(s, body_of((user, "my secret is 42"))).json()["accepted"] == 1
    assert s.out.to(user, 1)
    store = s.adapter.conversations
    assert wait(lambda: not store._conversations[("acme", f"wa:{user}")].resident)
    conv = store._conversations[("acme", f"wa:{user}")]
    blob_id, blob = conv.blob_id, store.blobs[conv.blob_id]       # sealed at rest between turns
    assert b"my secret" not in blob and blob_id in store._blob_keys
    url = f"{s.url}/admin/conversations/acme/{user}"
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers={"Authorization": "Bearer sk-acme-0123456789"}).status_code == 401
    r = httpx.delete(url, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["conversations"] == 1
    assert blob_id not in store.blobs and blob_id not in store._blob_keys
    assert ("acme", f"wa:{user}") not in store
    # a copy of the blob the host kept cannot be opened any more: its key is gone
    store.blobs[blob_id] = blob
    ghost = store._conversations.setdefault(("acme", "ghost"), type(conv)("acme", "ghost"))
    ghost.blob_id, ghost.epoch = blob_id, conv.epoch
    with pytest.raises(SealError, match="key"):
        store.open("acme", "ghost")
    assert store.erase("acme", "ghost") and blob_id not in store.blobs
    # the CLI does the same against the running server
    monkeypatch.setenv("ISTHMUS_ADMIN_KEY", ADMIN)
    assert main(["erase", "--tenant", "acme", "--user", user, "--server", s.url]) == 0
    assert "0 conversation(s)" in capsys.readouterr().out
    monkeypatch.setenv("ISTHMUS_ADMIN_KEY", "sk-wrong-0123456789")
    assert main(["erase", "--tenant", "acme", "--user", user, "--server", s.url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401" in err[0]


def test_histories_past_their_tenants_retention_are_erased(start, tmp_path):
    s = start(tmp_path / "o.sqlite3", Recorder(), retention_days=30.0, tenant_retention_days={"acme": 1.0})
    assert post(s, body_of(("15550100006", "hi"))).json()["accepted"] == 1
    assert s.out.to("15550100006", 1)
    assert wait(lambda: s.adapter._tasks == set())
    store = s.adapter.conversations
    assert s.adapter.expire(now=time.time() + 3600) == 0
    assert s.adapter.expire(now=time.time() + 2 * 86400) == 1 and ("acme", "wa:15550100006") not in store


def test_a_lone_surrogate_is_a_rejected_message_not_a_traceback(start, tmp_path, caplog):
    s = start(tmp_path / "o.sqlite3", Recorder())
    raw = body_of(("15550100007", "PLACEHOLDER")).replace(b"PLACEHOLDER", b"\\ud800 hi")
    with caplog.at_level(logging.WARNING):
        r = post(s, raw)
        assert r.status_code == 200 and r.json()["rejected"] == 1
        raw = body_of(("15550100007", "ok", "wamid.\\udfff"))
        raw = raw.replace(b"wamid.\\\\udfff", b"wamid.\\udfff")
        assert post(s, raw).json()["rejected"] == 1
        time.sleep(0.2)
    assert not any(rec.exc_info for rec in caplog.records)
    assert s.out.bodies("15550100007") == []


def test_the_verify_token_stays_out_of_the_access_log(start, tmp_path):
    s = start(tmp_path / "o.sqlite3", Recorder())
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    handler, level = Keep(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        r = httpx.get(s.url + "/webhooks/whatsapp", params={"hub.mode": "subscribe", "hub.challenge": "77",
                                                            "hub.verify_token": "verify-secret-token"})
        assert r.status_code == 200 and r.text == "77"
        assert wait(lambda: any("/webhooks/whatsapp" in line for line in lines), timeout=5)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert not any("verify-secret-token" in line for line in lines), lines
    assert any("hub.verify_token=[redacted]" in line for line in lines)
    rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s"', ("h", "GET", "/x?hub.verify_token=abc&b=1"), None)
    RedactSecrets().filter(rec)
    assert rec.getMessage() == 'h - "GET /x?hub.verify_token=[redacted]&b=1"'


def test_a_phone_number_for_an_unknown_tenant_is_a_one_line_error(tmp_path, capsys):
    cfg = WhatsAppConfig(verify_token="v", app_secret="s", phone_numbers={"1": "nobody"})
    with pytest.raises(InputError, match="unknown tenant 'nobody'"):
        cfg.check_tenants(tenants())
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"id": "acme", "api_key_sha256": [hash_key("sk-x-0123456789")]}],
                                "whatsapp": {"verify_token": "v", "app_secret": "s",
                                             "phone_numbers": {"10001": "acme", "10002": "acmee"}}}))
    assert main(["serve", "--tenants", str(path), "--model", str(tmp_path / "none.gguf"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10002" in err[0] and "'acmee'" in err[0], err


def test_under_the_simulated_tee_histories_live_in_the_enclave_sessions_store(tmp_path):
    from types import SimpleNamespace

    from isthmus.interop.envelope import SessionKey
    from isthmus.runtime.tee.audit import AuditLog, verify
    from isthmus.runtime.tee.conversations import ConversationStore

    store = ConversationStore(None, bytearray(32))
    session = SimpleNamespace(conversations=store, public_key=LocalEnclaveKey().public_key,
                              audit=AuditLog(tmp_path / "audit.log"))
    adapter = WhatsAppAdapter(WhatsAppConfig(verify_token="v", app_secret="s", phone_numbers={}),
                              outbound=Recorder(), enclave=SessionKey(session))
    assert adapter.conversations is store
    conv = store.open("acme", "wa:15550100009")
    conv.messages = [{"role": "user", "content": "hi"}]
    store.park(conv)
    assert adapter.erase("acme", "15550100009")["conversations"] == 1 and not store.blobs
    entries = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["erasure"] and "15550100009" not in json.dumps(entries)
    verify(tmp_path / "audit.log")
    own = WhatsAppAdapter(WhatsAppConfig(verify_token="v", app_secret="s", phone_numbers={}), outbound=Recorder())
    assert isinstance(own.conversations, ConversationStore) and own.conversations is not store


def test_an_undeliverable_reply_expires_counted_and_logged(start, tmp_path, caplog):
    s = start(tmp_path / "o.sqlite3", Recorder(fail=10**6), reply_ttl_s=0.5, retry_base_s=0.05, retry_max_s=0.1)
    with caplog.at_level(logging.WARNING):
        assert post(s, body_of(("15550100008", "anyone there?"))).json()["accepted"] == 1
        assert wait(lambda: s.adapter.outbox.pending() == 0, timeout=20)
    assert s.out.calls >= 2 and s.out.sent == []
    assert 'isthmus_webhook_events_total{outcome="expired"} 1' in s.state.metrics.render()
    assert any("expired" in r.getMessage() for r in caplog.records)
