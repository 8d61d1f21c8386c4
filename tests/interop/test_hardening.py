"""Denial of service and leaks (issue 13): slow clients, connection caps, header and body timeouts,
rate-limited logs, token and sequence limits, fair batch shares, cancelling a non-streamed request
whose client left, /metrics and /health, 404s that name no model, negative seeds, the tenants file.

Every server here listens on 127.0.0.1; attacks come from other loopback addresses (127.0.0.2, ...)
so the per-client cap can be told apart from the legitimate client, and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from isthmus.errors import InputError

KEYS = {"a": "sk-hard-a-0123456789", "b": "sk-hard-b-0123456789", "tpm": "sk-hard-tpm-0123456789",
        "seq": "sk-hard-seq-0123456789", "admin": "sk-hard-admin-0123456789"}
USER = [{"role": "user", "content": "Hello there"}]


def _doc():
    from isthmus.interop.tenants import hash_key
    return {"tenants": [
        {"id": "a", "api_key_sha256": [hash_key(KEYS["a"])], "requests_per_second": 0.01, "burst": 2},
        {"id": "b", "api_key_sha256": [hash_key(KEYS["b"])]},
        {"id": "tpm", "api_key_sha256": [hash_key(KEYS["tpm"])], "tokens_per_minute": 300},
        {"id": "seq", "api_key_sha256": [hash_key(KEYS["seq"])], "max_sequences": 2},
    ], "admin": {"api_key_sha256": [hash_key(KEYS["admin"])]}}


class Guarded:
    """The app under its connection guard (`connections.uvicorn_config`, as `isthmus serve` runs it)."""

    def __init__(self, app):
        import uvicorn
        from isthmus.interop.connections import uvicorn_config

        self.app, self.state = app, app.state.isthmus
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def client(self, key):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS[key], max_retries=0, timeout=60)

    def stop(self):
        from isthmus.interop.connections import LOGGERS, RateLimitedLog
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        for name in LOGGERS:                    # the log limit stays with this server, not the next tests
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, RateLimitedLog)]:
                logging.getLogger(name).removeFilter(f)


@pytest.fixture(scope="module")
def guarded(tiny_chat):
    from isthmus.interop.app import Limits, create_app
    from isthmus.interop.tenants import Tenants

    engine = tiny_chat.engine(max_batch=8, max_waiting=8)
    real = engine.decode

    def paced(exe, decoders, tokens):         # about 10 ms a step: long generations stay observable
        time.sleep(0.01)
        return real(exe, decoders, tokens)

    engine.decode = paced
    limits = Limits(64 << 10, max_connections=40, max_connections_per_client=10, header_timeout=1.0, body_timeout=1.0)
    s = Guarded(create_app({"tiny-chat": engine}, tenants=Tenants.from_config(_doc()), limits=limits))
    s.engine = engine
    yield s
    s.stop()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _open(port, source, n, payload=b"GET /health HTTP/1.1\r\nHost: x\r\n"):
    """`n` connections from `source`, each sending a request head that never ends."""
    out = []
    for _ in range(n):
        c = socket.socket()
        c.bind((source, 0))
        c.connect(("127.0.0.1", port))
        if payload:
            c.sendall(payload)
        out.append(c)
    return out


def _closed_by_server(socks, within: float) -> int:
    """How many of `socks` the server closed (EOF or reset) within `within` seconds."""
    pending, closed, deadline = set(socks), 0, time.monotonic() + within
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 0.05)
        for c in ready:
            try:
                data = c.recv(4096)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                closed += 1
                pending.discard(c)
    return closed


def _health_latency(url) -> float:
    t0 = time.perf_counter()
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    return time.perf_counter() - t0


# -- finding 3: slow clients --------------------------------------------------------------------------

def test_half_open_connections_are_capped_per_client_and_dropped_after_the_header_timeout(guarded):
    socks = _open(guarded.port, "127.0.0.2", 200)
    try:
        assert _closed_by_server(socks, 2.0) >= 190             # all beyond the per-client cap of 10, at once
        assert guarded.state.connections.open <= 10 + 2
        assert _health_latency(guarded.url) < 1.0              # another client is still served
        r = guarded.client("b").chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
        t0 = time.monotonic()
        assert _closed_by_server(socks, 3.0) == 200             # the 10 left go at the 1 s header timeout
        assert time.monotonic() - t0 < 2.5
    finally:
        for c in socks:
            c.close()


def test_many_addresses_evict_the_longest_idle_connection_and_health_still_answers(guarded):
    socks = []
    try:
        for i in range(60):                                     # 60 addresses, one slow connection each
            socks += _open(guarded.port, f"127.0.1.{i + 1}", 1)
        assert _wait(lambda: guarded.state.connections.open <= 40, 2)
        worst = max(_health_latency(guarded.url) for _ in range(5))
        assert worst < 1.0
        assert _closed_by_server(socks, 0.5) >= 20              # evicted, oldest first
        assert guarded.state.metrics.connections_closed.value(reason="evicted_idle") >= 20
    finally:
        for c in socks:
            c.close()


def test_a_keep_alive_connection_cannot_trickle_its_next_head(guarded):
    c = socket.create_connection(("127.0.0.1", guarded.port))
    try:
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in c.recv(4096)
        t0 = time.monotonic()
        for part in (b"GET /hea", b"lth HTTP/1.1\r\n", b"Host: x\r\n"):       # never the blank line
            c.sendall(part)
            time.sleep(0.3)
        assert _closed_by_server([c], 2.0) == 1 and time.monotonic() - t0 < 2.5
    finally:
        c.close()


def test_a_request_longer_than_the_header_timeout_is_not_cut_whatever_its_headers_say(guarded):
    """A stream outlives the 1 s header timeout; X-Forwarded-For must not hide it from the guard."""
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 150, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEYS['b']}", "X-Forwarded-For": "203.0.113.7"}
    t0 = time.monotonic()
    with httpx.stream("POST", guarded.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        text = "".join(r.iter_text())
    assert time.monotonic() - t0 > 1.2 and text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text


def test_a_slow_body_is_408_after_the_body_timeout(guarded):
    c = socket.create_connection(("127.0.0.1", guarded.port))
    try:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEYS["b"].encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\"")
        t0 = time.monotonic()
        c.settimeout(5)
        head = c.recv(4096)
        assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in head + c.recv(4096)
        assert 0.8 < time.monotonic() - t0 < 3
        assert _closed_by_server([c], 2.0) == 1
    finally:
        c.close()


def test_serve_under_a_slow_client_attack_keeps_answering_and_its_log_stays_short(tiny_chat, tmp_path):
    """The real `isthmus serve` with the new flags; stderr is the log."""
    from isthmus.interop.tenants import hash_key
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenants]]\nid = "b"\napi_key_sha256 = ["{hash_key(KEYS["b"])}"]\n')
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "isthmus.cli", "serve", "--model", str(tiny_chat.path),
                                 "--target", "reference", "--port", "0", "--tenants", str(tenants),
                                 "--max-connections", "60", "--max-connections-per-client", "20",
                                 "--header-timeout", "1", "--body-timeout", "1", "--log-level", "warning"],
                                stderr=err, text=True)
    socks = []
    try:
        assert _wait(lambda: re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text()), 60), log.read_text()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text()).group(1))
        lines_before = len(log.read_text().splitlines())
        assert _wait(lambda: _try_health(port), 30)
        for k in range(3):                                      # 3 x 100 from one address, 100 from many
            socks += _open(port, "127.0.0.2", 100)
            assert _health_latency(f"http://127.0.0.1:{port}") < 1.0
        for i in range(100):
            socks += _open(port, f"127.0.2.{i + 1}", 1)
        assert _health_latency(f"http://127.0.0.1:{port}") < 1.0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["b"], max_retries=0, timeout=30)
        assert client.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2).choices
        assert _closed_by_server(socks, 4.0) == len(socks)     # capped, evicted or timed out: none left
        grew = len(log.read_text().splitlines()) - lines_before
        assert grew < 60, log.read_text()[-3000:]              # 400 closed connections, a bounded log
        assert "log lines suppressed" in log.read_text() or grew < 30
    finally:
        for c in socks:
            c.close()
        proc.send_signal(2)
        proc.wait(timeout=30)


def _try_health(port) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_log_filter_lets_a_bounded_number_of_lines_through():
    from isthmus.interop.connections import RateLimitedLog
    now = [0.0]
    f = RateLimitedLog(per_second=2, burst=10, total_per_second=20, total_burst=100, clock=lambda: now[0])
    rec = lambda: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed: %s", ("EMFILE",), None)  # noqa: E731
    passed = sum(f.filter(rec()) for _ in range(100_000))
    assert passed == 10
    now[0] += 1.0
    r = rec()
    assert f.filter(r) and "99990 log lines suppressed" in r.getMessage()


# -- finding 4: limits count work ---------------------------------------------------------------------

def test_one_tenant_cannot_take_every_slot_from_another(guarded):
    """A (burst 2) starts 2 streams of n=8 long generations; B's 3 requests in a row are served at once."""
    engine, model = guarded.engine, "tiny-chat"
    prompt = [{"role": "user", "content": "Tell me everything"}]
    budget = 256 - len(engine.tokenizer.encode(engine.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))) - 1
    a = openai.AsyncOpenAI(base_url=guarded.url + "/v1", api_key=KEYS["a"], max_retries=0, timeout=120)
    results = {}

    async def hog(i):
        stream = await a.chat.completions.create(model=model, messages=prompt, n=8, max_tokens=budget,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        results[f"a{i}"] = (time.monotonic(), usage.completion_tokens)

    async def polite():
        deadline = time.monotonic() + 30                              # (a loaded machine admits slowly)
        while not (engine.running == 8 and engine.load().get("a") == 16) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.running == 8 and engine.load()["a"] == 16       # A holds every slot, and more waiting
        b = openai.AsyncOpenAI(base_url=guarded.url + "/v1", api_key=KEYS["b"], max_retries=0, timeout=60)
        for i in range(3):
            r = await b.chat.completions.create(model=model, messages=USER, max_tokens=4, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length")
        results["b"] = (time.monotonic(), None)
        await b.close()

    async def main():
        try:
            await asyncio.gather(hog(0), hog(1), polite())
        finally:
            await a.close()

    preempted = engine.preemptions
    asyncio.run(main())
    assert results["b"][0] < min(results["a0"][0], results["a1"][0])   # B did not wait for A to finish
    assert results["a0"][1] == results["a1"][1] == 8 * budget            # A's preempted sequences resumed to the end
    assert engine.preemptions > preempted
    assert _wait(lambda: engine.running == 0 and engine.waiting == 0)


def test_preempted_sequences_resume_with_the_same_tokens(tiny_chat):
    """Greedy replies of a tenant preempted again and again equal the uninterrupted runtime's."""
    from isthmus.runtime.engine import Delta, Finished
    from isthmus.runtime.sampling import SamplingParams
    engine = tiny_chat.engine(max_batch=2, max_waiting=8).start()
    try:
        msgs = [USER, [{"role": "user", "content": "Count to ten"}]]
        want = [tiny_chat.expected(m, max_tokens=40, temperature=0)[0] for m in msgs]
        got, done = [[], []], threading.Event()
        finished = []

        def sink(i):
            def put(ev):
                if isinstance(ev, Delta):
                    got[i].append(ev.text)
                elif isinstance(ev, Finished):
                    finished.append(i)
                    if len(finished) == 2:
                        done.set()
            return put

        for i, m in enumerate(msgs):
            engine.submit(tiny_chat.prompt_ids(m), SamplingParams(max_tokens=40, temperature=0), sink(i), tenant="x")
        assert _wait(lambda: engine.running == 2 and engine.steps >= 2)     # x holds both slots
        for k in range(6):                  # other tenants keep arriving: x is preempted down to its share
            engine.submit(tiny_chat.prompt_ids(USER), SamplingParams(max_tokens=3, temperature=0), lambda ev: None,
                          tenant=f"y{k}")
        assert done.wait(60)
        assert engine.preemptions >= 1
        assert ["".join(g) for g in got] == want
    finally:
        engine.stop()


def test_tokens_per_minute_count_prompt_and_completion_times_n(guarded, tiny_chat):
    c = guarded.client("tpm")                                  # 300 tokens a minute
    p = len(tiny_chat.prompt_ids(USER))
    with pytest.raises(openai.RateLimitError) as e:            # (prompt + 100) x 8 can never fit
        c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=100, n=8)
    assert "Request too large" in e.value.message and "retry-after" not in e.value.response.headers
    t0 = time.monotonic()
    r = c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=150 - p, n=2)
    refill = (time.monotonic() - t0) * 300 / 60
    used = r.usage.prompt_tokens * 2 + r.usage.completion_tokens
    tenant = guarded.state.tenants.get("tpm")
    assert 300 - used - 1 <= tenant.token_bucket.tokens <= 300 - used + refill + 1   # reserved, refunded to use
    with pytest.raises(openai.RateLimitError) as e:            # fits the limit, not what is left of it
        c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=256 - p)
    assert int(e.value.response.headers["retry-after"]) >= 1 and "Token rate limit" in e.value.message
    assert tenant.sequences == 0


def test_concurrent_sequences_per_tenant(guarded):
    c = guarded.client("seq")                                  # max_sequences = 2
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2, n=3)
    assert "2 sequences at once" in e.value.message
    with c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=200, n=2, stream=True,
                                   extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
    assert _wait(lambda: guarded.state.tenants.get("seq").sequences == 0)
    assert c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2).choices


def test_admit_is_all_or_nothing():
    from isthmus.interop.tenants import RateLimited, Tenants
    t = Tenants.from_config({"tenants": [{"id": "w", "tokens_per_minute": 100, "max_sequences": 1,
                                          "requests_per_second": 1, "burst": 1}]}).get("w")
    g = t.admit(tokens=60, sequences=1, requests=1)
    with pytest.raises(RateLimited) as e:                      # sequences refuse: nothing else is charged
        t.admit(tokens=10, sequences=1, requests=1)
    assert e.value.kind == "sequences" and t.token_bucket.tokens == pytest.approx(40, abs=1)
    g.release(used_tokens=20)
    g.release(used_tokens=0)                                   # idempotent
    assert t.sequences == 0 and t.token_bucket.tokens == pytest.approx(80, abs=1)
    with pytest.raises(RateLimited) as e:
        t.admit(tokens=10, sequences=1, requests=1)            # the request bucket is empty
    assert e.value.kind == "requests" and t.sequences == 0 and t.token_bucket.tokens == pytest.approx(80, abs=1)


# -- finding 6: a non-streamed request whose client left ----------------------------------------------

def test_a_non_streamed_request_is_cancelled_within_a_step_of_its_client_leaving(guarded):
    engine = guarded.engine
    body = json.dumps({"model": "tiny-chat", "messages": USER, "n": 8, "max_tokens": 200, "ignore_eos": True}).encode()
    c = socket.create_connection(("127.0.0.1", guarded.port))
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEYS["b"].encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert _wait(lambda: engine.running == 8, 10)
    time.sleep(0.1)
    c.close()
    steps = engine.steps
    assert _wait(lambda: engine.running == 0, 2)
    assert engine.steps - steps <= 2
    assert _wait(lambda: guarded.state.tenants.get("b").sequences == 0, 2)


# -- finding 7: what leaks without a key --------------------------------------------------------------

def test_metrics_need_a_key_and_a_tenant_sees_only_its_own_series(guarded):
    guarded.client("b").chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
    guarded.client("seq").chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
    r = httpx.get(guarded.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    mine = httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['b']}"}).text
    assert 'tenant="b"' in mine and 'tenant="seq"' not in mine and "isthmus_requests_total" not in mine
    everything = httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    assert 'tenant="b"' in everything and 'tenant="seq"' in everything and "isthmus_open_connections" in everything


def test_health_says_only_ok_and_errors_name_no_model(guarded, tiny_chat):
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key
    assert httpx.get(guarded.url + "/health").json() == {"status": "ok"}
    tenants = Tenants.from_config({"tenants": [{"id": "n", "api_key_sha256": [hash_key(KEYS["a"])],
                                                "models": ["other-model"]}]})
    s = Guarded(create_app({"secret-model": tiny_chat.engine()}, tenants=tenants))
    try:
        auth = {"Authorization": f"Bearer {KEYS['a']}"}
        for model in ("secret-model", "nope"):
            r = httpx.post(s.url + "/v1/chat/completions", headers=auth, json={"model": model, "messages": USER})
            assert r.status_code == 404 and "secret-model" not in r.text.replace(f"`{model}`", "")
            r = httpx.get(s.url + f"/v1/models/{model}", headers=auth)
            assert r.status_code == 404
        assert httpx.get(s.url + "/v1/models", headers=auth).json()["data"] == []
    finally:
        s.stop()


# -- finding 8: no input gives a 500 ------------------------------------------------------------------

def test_negative_seeds_are_valid_and_reproducible(guarded):
    c = guarded.client("b")
    kw = dict(model="tiny-chat", messages=USER, max_tokens=8, temperature=1.0)
    for seed in (-1, -(2**63)):
        a, b = (c.chat.completions.create(seed=seed, **kw).choices[0].message.content for _ in range(2))
        assert a == b
    r = httpx.post(guarded.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['b']}"},
                   json={**kw, "seed": -5, "n": 2})
    assert r.status_code == 200, r.text


# -- finding 10 (the tenants part): the tenants file is checked at load --------------------------------

H1, H2 = "a" * 64, "b" * 64


@pytest.mark.parametrize("doc,needle", [
    ({"tenants": [{"id": "x", "api_key_sha256": [H1]}, {"id": "y", "api_key_sha256": [H1]}]}, "also a key of"),
    ({"tenants": [{"id": "x", "api_key_sha256": [H1, H1.upper()]}]}, "same hash twice"),
    ({"tenants": [{"id": "x", "api_key_sha256": [H1]}], "admin": {"api_key_sha256": [H1]}}, "admin"),
    ({"tenants": [{"id": "x", "requests_per_second": float("inf")}]}, "requests_per_second"),
    ({"tenants": [{"id": "x", "requests_per_second": float("nan")}]}, "requests_per_second"),
    ({"tenants": [{"id": "x", "requests_per_second": 1, "burst": -3}]}, "burst"),
    ({"tenants": [{"id": "x", "requests_per_second": 1, "burst": 2.5}]}, "burst"),
    ({"tenants": [{"id": "x", "tokens_per_minute": "lots"}]}, "tokens_per_minute"),
    ({"tenants": [{"id": "x", "tokens_per_minute": 0}]}, "tokens_per_minute"),
    ({"tenants": [{"id": "x", "max_sequences": -1}]}, "max_sequences"),
    ({"tenants": [{"id": "x", "max_sequences": True}]}, "max_sequences"),
    ({"tenants": [{"id": "x", "models": [""]}]}, "models"),
    ({"tenants": [{"id": "x", "max_tokens": 5}]}, "unknown field"),
    ({"tenant": [{"id": "x"}]}, "unknown table"),
    ({"admin": {"api_key_sha256": [H2], "note": 1}}, "admin"),
])
def test_a_bad_tenants_file_is_one_input_error(doc, needle):
    from isthmus.interop.tenants import Tenants
    with pytest.raises(InputError) as e:
        Tenants.from_config(doc, "t.toml")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("t.toml")


def test_serve_refuses_a_bad_tenants_file_and_bad_limits_in_one_line(tmp_path, capsys):
    from isthmus.cli import main
    bad = tmp_path / "t.toml"
    bad.write_text(f'[[tenants]]\nid = "x"\napi_key_sha256 = ["{H1}"]\n[[tenants]]\nid = "y"\napi_key_sha256 = ["{H1}"]\n')
    for argv, needle in ([["--tenants", str(bad)], "also a key of"],
                         [["--max-connections", "0"], "--max-connections"],
                         [["--header-timeout", "inf"], "--header-timeout"],
                         [["--max-connections", "999999"], "open files"]):
        assert main(["serve", "--port", "0", "--model", str(tmp_path / "never-loaded.gguf"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
