"""Scale-out through Ray Serve (interop/scale.py, shared_state.py, affinity.py; docs/serving.md).

Fast: the shared-state contract against the in-process implementation and against the remote one
(`RemoteState` forwarding to a `LocalState`, as the Ray actor does); the affinity ranking; the
flags' one-line errors; Ray is not imported without --replicas.

Slow (they start Ray): a local Ray in a temporary directory, `isthmus serve --replicas 2` joined to
it, then the official openai client: 16 concurrent requests on both replicas, a burst of 4 across
replicas, a webhook message delivered to both replicas answered once, conversation affinity and
`previous_response_id` across replicas, metrics with a replica label, a replica killed mid-load.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from isthmus.interop.affinity import rank, request_affinity
from isthmus.interop.shared_state import LocalState, OwnedResponseStore, RemoteState, SharedBucket, SharedOutbox

from cli_runner import one_line_error, run  # tests/support
from tiny_models import write_tiny_chat_gguf

KEYS = {"acme": "sk-test-acme-0123456789", "burst4": "sk-test-burst4-0123456789",
        "admin": "sk-test-admin-0123456789"}
SECRET, VERIFY, PNID = "app-secret-123", "verify-me", "10001"


# -- the shared-state contract: every implementation ------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def _implementations(clock):
    local = LocalState(clock=clock)
    inner = LocalState(clock=clock)
    remote = RemoteState(lambda method, *args: getattr(inner, method)(*args))
    return {"in-process": local, "remote": remote}


def check_contract(state, clock) -> None:
    """What every SharedState must do (run on LocalState, RemoteState and the Ray actor)."""
    # a request bucket of burst 4 grants 4 of 10, whoever asks
    a, b = SharedBucket(state, "t:requests", 0.001, 4), SharedBucket(state, "t:requests", 0.001, 4)
    granted = [bucket.take(1) == 0 for bucket in (a, b) * 5]
    assert sum(granted) == 4
    assert a.wait(1) > 0
    tokens = SharedBucket(state, "t:tokens", 1.0, 100)
    assert tokens.take(80) == 0 and tokens.wait(30) > 0
    tokens.put(50)
    assert tokens.wait(30) == 0

    # ownership: claimed, seen by all, gone with its owner's silence or a release
    state.claim("response", "", "resp_1", "r1")
    assert state.owner("response", "", "resp_1") == "r1"
    clock.now += 60
    assert state.owner("response", "", "resp_1") is None       # r1 has not been heard from
    state.heartbeat("r1")
    assert state.owner("response", "", "resp_1") == "r1"
    state.release("response", "", "resp_1")
    assert state.owner("response", "", "resp_1") is None

    # the webhook outbox: de-duplication, pins, entries leased to one replica at a time
    o1, o2 = SharedOutbox(state, "r1", clock=clock), SharedOutbox(state, "r2", clock=clock)
    with o1.transaction():
        with pytest.raises(Exception, match="locked"):
            with o2.transaction(timeout_s=0.05):
                pass
        assert not o1.seen(PNID, "wamid.1")
        o1.add("acme", PNID, "15550001111", "wamid.1", "hello", None, 3600.0)
        o1.remember(PNID, "wamid.1")
    with o2.transaction():
        assert o2.seen(PNID, "wamid.1")                          # the other replica sees it: a duplicate
    o2.put_pin("acme", "15550001111", b"k" * 32, 2**63 + 5)
    assert o1.get_pin("acme", "15550001111") == (b"k" * 32, 2**63 + 5)
    assert o1.pending("acme") == 1
    state.heartbeat("r2")
    got = o1.due(4)
    assert [e.message_id for e in got] == ["wamid.1"]
    assert o2.due(4) == []                                       # leased to r1, and r1 owns the conversation
    clock.now += 200                                             # r1 went silent and its lease ran out
    retaken = o2.due(4)
    assert [e.message_id for e in retaken] == ["wamid.1"]      # nothing accepted is lost
    o2.set_reply(retaken[0], ["hi"])
    o2.mark_sent(retaken[0], 1)
    o2.done(retaken[0].id)
    assert o1.pending() == 0


@pytest.mark.parametrize("kind", ["in-process", "remote"])
def test_shared_state_contract(kind):
    clock = Clock()
    check_contract(_implementations(clock)[kind], clock)


def test_two_replicas_share_a_tenants_token_and_request_limits():
    from isthmus.interop.shared_state import LocalState, share_limits
    from isthmus.interop.tenants import RateLimited, Tenants
    doc = {"tenants": [{"id": "t", "tokens_per_minute": 100, "requests_per_second": 0.001, "burst": 3}]}
    state = LocalState()
    one, two = Tenants.from_config(doc), Tenants.from_config(doc)        # what each replica builds
    share_limits(one, state)
    share_limits(two, state)
    grant = one.get("t").admit(tokens=60, requests=1)
    with pytest.raises(RateLimited, match="Token rate limit"):
        two.get("t").admit(tokens=60, requests=1)                        # the other replica sees the 60
    grant.release(used_tokens=10)                                         # 50 refunded, for both
    two.get("t").admit(tokens=60, requests=1)
    one.get("t").admit(tokens=1, requests=1)                              # the refused one took no request
    with pytest.raises(RateLimited, match="Rate limit reached"):
        two.get("t").admit(tokens=1, requests=1)                          # 3 requests in all: burst 3


def test_owned_responses_route_by_id():
    state = LocalState()
    store = OwnedResponseStore(state, "r1")
    store.put("acme", "resp_9", {"id": "resp_9"}, [])
    assert state.owner("response", "", "resp_9") == "r1"
    assert not store.delete("other", "resp_9")                  # another tenant's DELETE names nothing
    assert state.owner("response", "", "resp_9") == "r1"
    assert store.delete("acme", "resp_9")
    assert state.owner("response", "", "resp_9") is None


def test_a_replica_labels_every_series():
    from isthmus.interop.metrics import Metrics
    m = Metrics()
    m.requests.inc(route="/health", status="200")
    m.latency.observe(0.01, route="/health")
    m.gauge("isthmus_open_connections", "open", lambda: 3)
    plain = m.render()
    m.labels = {"replica": "abc"}
    labelled = m.render()
    assert 'isthmus_requests_total{replica="abc",route="/health",status="200"} 1' in labelled
    assert 'isthmus_open_connections{replica="abc"} 3' in labelled
    assert 'isthmus_request_duration_seconds_bucket{replica="abc",route="/health",le="0.01"} 1' in labelled
    assert plain.replace('replica="abc",', "") == labelled.replace('replica="abc",', "").replace('{replica="abc"}', "")


# -- affinity -------------------------------------------------------------------------------------

def _chat(messages, key="k"):
    return request_affinity("POST", "/v1/chat/completions", f"Bearer {key}",
                            json.dumps({"model": "m", "messages": messages}).encode())


def test_a_conversation_keeps_its_key_across_turns():
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert _chat(turn1) == _chat(turn2)
    assert _chat(turn1) != _chat(turn1, key="other-tenant")
    assert _chat(turn1) != _chat([{"role": "user", "content": "another"}])
    body = json.dumps({"model": "m", "input": "x", "previous_response_id": "resp_1"}).encode()
    assert request_affinity("POST", "/v1/responses", None, body) == {"response": "resp_1"}
    assert request_affinity("GET", "/v1/responses/resp_2", None, b"") == {"response": "resp_2"}
    assert request_affinity("POST", "/v1/chat/completions", None, b"{not json") == {}
    assert request_affinity("GET", "/v1/models", None, b"") == {}


def test_rank_prefers_owner_then_hash_then_least_loaded():
    replicas = ["a", "b", "c"]
    assert rank(replicas, {"response": "x"}, "b", {"b": 50}) == [["b"], ["a", "c"]]   # never bypassed
    keyed = rank(replicas, {"key": "conv"}, None, {})
    top = keyed[0][0]
    assert all(rank(replicas, {"key": "conv"}, None, {})[0] == [top] for _ in range(3))
    assert rank(replicas, {"key": "conv"}, None, {top: 10})[0][0] != top       # too busy: least loaded
    others = [r for r in replicas if r != top]
    assert rank(others + [top], {"key": "conv"}, None, {})[0] == [top]       # order does not matter
    moved = [k for k in map(str, range(200)) if rank(replicas, {"key": k}, None, {})[0][0] != "c"
             and rank(["a", "b"], {"key": k}, None, {})[0][0] != rank(replicas, {"key": k}, None, {})[0][0]]
    assert moved == []              # removing c moves only c's conversations
    assert rank(replicas, {}, None, {"a": 3, "b": 1, "c": 2}) == [["b", "c", "a"]]


# -- flags ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--replicas", "0"], "--replicas must be 1..1024"),
    (["--replicas", "2", "--autoscale", "3:1"], "--autoscale must be MIN:MAX"),
    (["--replicas", "2", "--autoscale", "two"], "--autoscale must be MIN:MAX"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --replicas"),
    (["--autoscale", "1:2"], "--autoscale needs --replicas"),
    (["--replica-cpus", "2"], "--replica-cpus needs --replicas"),
    (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be 1..4096"),
    (["--replicas", "2", "--sealed", "x.isth"], "--sealed with --replicas is not supported"),
    (["--replicas", "2", "--max-connections", "10"], "--max-connections does not apply with --replicas"),
    (["--replicas", "2", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--replicas", "2"], "nowhere.gguf: no such file or folder"),
])
def test_bad_scale_flags_are_one_line_errors(capsys, flags, needle):
    rc, _, err = run(capsys, "serve", "--model", "nowhere.gguf", *flags)
    one_line_error(rc, err, needle)


def test_without_ray_installed_the_error_says_which_extra(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("ray") else real(name, *a))
    rc, _, err = run(capsys, "serve", "--replicas", "2")
    one_line_error(rc, err, "pip install 'isthmus[scale]'")


def test_ray_is_not_imported_without_replicas(tmp_path):
    model = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    code = f"""
import sys
import isthmus.interop.app, isthmus.interop.shared_state, isthmus.interop.affinity
from isthmus.cli import build_parser
from isthmus.interop.cli import build
args = build_parser().parse_args(["serve", "--model", {str(model)!r}, "--target", "reference"])
app, _, _ = build(args)
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")], "ray imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ISTHMUS_HOME": str(tmp_path / "home")})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# -- slow: a local Ray, `isthmus serve --replicas 2`, the official openai client ----------------------

class FakePlatform:
    """Where the replicas post webhook replies: {base}/{phone_number_id}/messages."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"messages": [{"id": "wamid.out"}]}')

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v21.0"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def to(self, sender: str) -> list:
        return [p for p in self.posts if p.get("to") == sender]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray in a short temporary directory (its socket paths must fit), torn down after."""
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="isr", dir="/tmp")
    metrics_port = _free_port()
    ray.init(_temp_dir=tmp, num_cpus=4, include_dashboard=False, namespace="isthmus-tests", log_to_driver=False,
             logging_level="WARNING", _metrics_export_port=metrics_port)
    try:
        yield ray.get_runtime_context().gcs_address, metrics_port
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(argv: list[str], **kwargs) -> subprocess.Popen:
    """`isthmus serve ...` as its own process, which gets SIGTERM if this one dies first (a killed
    pytest must not leave a server and its Ray behind). Stopped with SIGTERM, not SIGINT: a shell
    that runs pytest in the background starts it with SIGINT ignored, and so every child too."""
    def die_with_parent():
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    return subprocess.Popen([sys.executable, "-c", "import sys; from isthmus.cli import main; sys.exit(main())",
                             "serve", *argv], preexec_fn=die_with_parent, **kwargs)


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    import signal
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scaled:
    def __init__(self, url, proc, platform):
        self.url, self.proc, self.platform = url, proc, platform

    def client(self, key="acme", **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS[key], max_retries=0, timeout=120, **kwargs)

    @staticmethod
    def replicas() -> list[str]:
        import ray
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return sorted(n.rsplit("#", 1)[1] for n in names if n.startswith("SERVE_REPLICA::isthmus#ModelReplica#"))

    def post_webhook(self, payload: dict) -> httpx.Response:
        from isthmus.interop.webhook import signature
        body = json.dumps(payload).encode()
        return httpx.post(self.url + "/webhooks/whatsapp", content=body, timeout=60,
                          headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature(SECRET, body)})


@pytest.fixture(scope="module")
def scaled(ray_cluster, tmp_path_factory):
    """`isthmus serve --replicas 2` on the tiny chat model, joined to the test's Ray."""
    address, metrics_port = ray_cluster
    from isthmus.interop.tenants import hash_key
    tmp = tmp_path_factory.mktemp("scaled")
    model = write_tiny_chat_gguf(tmp / "tiny-chat.gguf", context_length=2048)
    platform = FakePlatform()
    tenants = {"tenants": [
        {"id": "acme", "api_key_sha256": [hash_key(KEYS["acme"])]},
        {"id": "burst4", "api_key_sha256": [hash_key(KEYS["burst4"])], "requests_per_second": 0.001, "burst": 4}],
        "admin": {"api_key_sha256": [hash_key(KEYS["admin"])]},
        "whatsapp": {"verify_token": VERIFY, "app_secret": SECRET, "phone_numbers": {PNID: "acme"},
                     "graph_url": platform.url, "access_token": "t", "max_tokens": 4, "temperature": 0.0,
                     "outbox": str(tmp / "outbox.sqlite3")}}
    (tmp / "tenants.json").write_text(json.dumps(tenants))
    port = _free_port()
    proc = _serve(["--replicas", "2", "--ray-address", address, "--model", str(model), "--model-id", "tiny-chat",
                   "--target", "reference", "--tenants", str(tmp / "tenants.json"), "--port", str(port)],
                  stdout=subprocess.PIPE, stderr=open(tmp / "serve.log", "w"), text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the scaled server did not come up"
            try:
                seen = {httpx.get(url + "/health", timeout=5).headers.get("x-isthmus-replica") for _ in range(6)}
                if len(Scaled.replicas()) == 2 and None not in seen:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        scaled = Scaled(url, proc, platform)
        scaled.metrics_port = metrics_port
        _until_each_replica_takes_requests(scaled, deadline)
        yield scaled
    finally:
        try:
            _stop(proc, 60)
        finally:
            platform.httpd.shutdown()


def _until_each_replica_takes_requests(scaled, deadline):
    """Both replicas listed is not both routable yet (Serve's router learns of a new replica a moment
    later): wait until a conversation placed on each one is answered there."""
    client = scaled.client()
    while True:
        placed = _texts_for_each(scaled.replicas(), 1, "acme")
        if all(_ask(client, texts[0], max_tokens=1)[0] == rid for rid, texts in placed.items()):
            return
        assert time.monotonic() < deadline, "a replica never took the requests the router places on it"
        time.sleep(0.5)


def _ask(client, text, max_tokens=8, **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-chat", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, **kwargs)
    return raw.headers["x-isthmus-replica"], raw.parse()


def _texts_for_each(replicas: list[str], n: int, key: str) -> dict[str, list[str]]:
    """n user messages whose conversations the router places on each replica (its own ranking)."""
    out = {r: [] for r in replicas}
    i = 0
    while any(len(v) < n for v in out.values()):
        text = f"conversation {i}"
        i += 1
        aff = request_affinity("POST", "/v1/chat/completions", f"Bearer {KEYS[key]}", json.dumps(
            {"model": "tiny-chat", "messages": [{"role": "user", "content": text}]}).encode())
        top = rank(replicas, aff, None, {})[0][0]
        if len(out[top]) < n:
            out[top].append(text)
    return out


DOC = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def _doc_commands() -> list[str]:
    import re
    section = DOC.read_text().split("### Single machine", 1)[1].split("###", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--autoscale", "1:3"]], ids=["replicas", "autoscale"])
def test_the_single_machine_recipe_runs_as_documented(tmp_path, extra):
    """The docs' commands on the tiny model (a local Ray, started and stopped by `isthmus serve`).
    Runs before the module's own Ray starts: no other cluster to join by mistake."""
    from isthmus.interop.tenants import hash_key
    commands = _doc_commands()
    assert commands[0] == "pip install 'isthmus[scale]'"
    serve_cmd, curl = commands[1], commands[2]
    port, key = _free_port(), "sk-docs-0123456789"
    (tmp_path / "tenants.toml").write_text(f'[[tenants]]\nid = "acme"\napi_key_sha256 = ["{hash_key(key)}"]\n')
    model = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    argv = serve_cmd.split()
    assert argv[:4] == ["isthmus", "serve", "--replicas", "2"], serve_cmd
    argv = [a.replace("8000", str(port)) for a in argv[1:]]
    argv[argv.index("--model") + 1] = str(model)
    argv += ["--model-id", "smollm2-135m-instruct", "--target", "reference", *extra]
    ray_tmp = tempfile.mkdtemp(prefix="isd", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "ISTHMUS_API_KEY": key}
    env.pop("RAY_ADDRESS", None)
    proc = _serve(argv[1:], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while line and "isthmus: serving on" not in line:
            line = proc.stderr.readline()
        assert "isthmus: serving on" in line, "isthmus serve --replicas did not start"
        assert ("1..3 (autoscaled)" if extra else "with 2 replicas") in line and "(local)" in line
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", curl.replace("8000", str(port))], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.lower().startswith("x-isthmus-replica: "), out.stderr
    finally:
        try:
            assert _stop(proc, 90) == 0
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_shared_state_contract_on_a_ray_actor(ray_cluster):
    import ray

    class SteppedState(LocalState):          # defined here: Ray ships it by value
        def __init__(self):
            self.now = 1_000_000.0
            super().__init__(clock=lambda: self.now)

        def step(self, seconds):
            self.now += seconds

    actor = ray.remote(SteppedState).remote()
    state = RemoteState(lambda method, *args: ray.get(getattr(actor, method).remote(*args)))

    class Advance:
        @property
        def now(self):
            return 0.0

        @now.setter
        def now(self, value):
            ray.get(actor.step.remote(value))

    clock = Advance()
    check_contract(state, clock)
    ray.kill(actor)


@pytest.mark.slow
def test_16_concurrent_requests_complete_on_both_replicas(scaled):
    client = scaled.client()
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: _ask(client, f"question number {i}"), range(16)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for _, r in got)
    assert sorted({rid for rid, _ in got}) == scaled.replicas()


@pytest.mark.slow
def test_a_burst_of_4_holds_across_both_replicas(scaled):
    import openai
    client = scaled.client("burst4")
    texts = _texts_for_each(scaled.replicas(), 5, "burst4")     # 5 conversations placed on each replica

    def one(text):
        try:
            return _ask(client, text, max_tokens=1)[0], 200
        except openai.RateLimitError as e:
            return e.response.headers.get("x-isthmus-replica"), 429

    with cf.ThreadPoolExecutor(10) as pool:
        got = list(pool.map(one, [t for ts in texts.values() for t in ts]))
    assert sum(status == 200 for _, status in got) == 4
    assert sum(status == 429 for _, status in got) == 6
    assert {rid for rid, _ in got} == set(scaled.replicas())   # both replicas took some of the 10


@pytest.mark.slow
def test_a_webhook_message_delivered_to_both_replicas_is_processed_once(scaled):
    for attempt in range(5):
        sender, mid = f"1555000{attempt:04d}", f"wamid.both{attempt}.{time.time_ns()}"
        payload = {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": [{"field": "messages",
                   "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": PNID},
                             "messages": [{"from": sender, "id": mid, "timestamp": str(int(time.time())),
                                           "type": "text", "text": {"body": "hello"}}]}}]}]}
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: scaled.post_webhook(payload), range(8)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        if len({a.headers["x-isthmus-replica"] for a in answers}) == 2:
            break
    else:
        pytest.fail("the 8 deliveries never reached both replicas")
    acks = [a.json() for a in answers]
    assert sum(a["accepted"] for a in acks) == 1 and sum(a["duplicates"] for a in acks) == 7
    deadline = time.monotonic() + 60
    while not scaled.platform.to(sender) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)                                       # a second reply would have come by now
    assert len(scaled.platform.to(sender)) == 1


@pytest.mark.slow
def test_a_conversation_stays_on_its_replica_and_previous_response_id_works_anywhere(scaled):
    client = scaled.client()
    for replica, texts in _texts_for_each(scaled.replicas(), 1, "acme").items():
        messages = [{"role": "user", "content": texts[0]}]
        for _ in range(3):                                # each turn repeats the first: same replica
            raw = client.chat.completions.with_raw_response.create(model="tiny-chat", messages=messages, max_tokens=4)
            assert raw.headers["x-isthmus-replica"] == replica
            messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content or "x"},
                         {"role": "user", "content": "and then?"}]
    raw = client.responses.with_raw_response.create(model="tiny-chat", input="remember this", max_output_tokens=4)
    owner, first = raw.headers["x-isthmus-replica"], raw.parse()
    for _ in range(4):                                    # the follow-ups go where the response is stored
        raw = client.responses.with_raw_response.create(model="tiny-chat", input="and?", max_output_tokens=4,
                                                        previous_response_id=first.id)
        assert raw.headers["x-isthmus-replica"] == owner and raw.parse().status in ("completed", "incomplete")
    assert client.responses.retrieve(first.id).id == first.id


@pytest.mark.slow
def test_metrics_carry_the_replica_label(scaled):
    seen = set()
    for _ in range(10):
        r = httpx.get(scaled.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"})
        assert r.status_code == 200
        rid = r.headers["x-isthmus-replica"]
        assert f'isthmus_requests_total{{replica="{rid}",' in r.text
        seen.add(rid)
    assert seen <= set(scaled.replicas())
    deadline, exported = time.monotonic() + 90, {}
    while time.monotonic() < deadline and set(exported) != seen:   # Ray's export, every few seconds
        text = httpx.get(f"http://127.0.0.1:{scaled.metrics_port}/metrics", timeout=10).text
        exported = {line.split('replica="')[1].split('"')[0]: line for line in text.splitlines()
                    if line.startswith("ray_isthmus_replica_requests_total{") and 'route="/metrics"' in line}
        time.sleep(1)
    assert set(exported) == seen, sorted(exported)


@pytest.mark.slow
def test_killing_a_replica_mid_load_fails_only_its_requests(scaled):
    """Runs last: it kills a replica (Ray Serve starts another)."""
    import threading

    import openai
    import ray
    client = scaled.client()
    replicas = scaled.replicas()
    texts = _texts_for_each(replicas, 4, "acme")
    started = threading.Semaphore(0)

    def stream(text):
        with client.chat.completions.with_streaming_response.create(
                model="tiny-chat", messages=[{"role": "user", "content": text}], max_tokens=1500, stream=True,
                temperature=0.0, extra_body={"ignore_eos": True}) as resp:
            rid, data = resp.headers["x-isthmus-replica"], []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
                    if len(data) == 1:
                        started.release()
        return rid, data

    def whole(text):
        try:
            return _ask(client, text, max_tokens=1500, extra_body={"ignore_eos": True})[0]
        except openai.APIStatusError as e:
            return e

    def typed_events(response_id):                          # a Responses API stream, on the victim
        events = []
        for ev in client.responses.create(model="tiny-chat", input="go on", max_output_tokens=1500, stream=True,
                                          previous_response_id=response_id, temperature=0.0):
            events.append(ev)
            if len(events) == 1:
                started.release()
        return events

    stored = client.responses.with_raw_response.create(model="tiny-chat", input="start", max_output_tokens=2)
    victim = stored.headers["x-isthmus-replica"]            # the replica that holds that response
    with cf.ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(stream, t) for ts in texts.values() for t in ts[:3]]
        blocking = pool.submit(whole, texts[victim][3])      # a non-streamed request on the victim
        typed = pool.submit(typed_events, stored.parse().id)
        for _ in futures + [typed]:
            assert started.acquire(timeout=60)              # every stream is under way
        ray.kill(ray.get_actor(f"SERVE_REPLICA::isthmus#ModelReplica#{victim}", namespace="serve"))
        results = [f.result(timeout=120) for f in futures]
        failed = blocking.result(timeout=120)
        events = typed.result(timeout=120)
    assert events[-1].type == "error" and events[-1].code == "replica_unavailable", events[-1]   # typed stream
    assert isinstance(failed, openai.APIStatusError) and failed.status_code == 503, failed
    assert failed.body["code"] == "replica_unavailable"      # a clean error in OpenAI's shape
    for rid, data in results:
        assert data[-1] == "[DONE]"
        if rid == victim:                                   # an error event, then [DONE]
            assert json.loads(data[-2])["error"]["code"] == "replica_unavailable", data[-3:]
        else:                                               # the other replica's streams end normally
            assert "error" not in json.loads(data[-2]) and json.loads(data[-2])["choices"] is not None
    assert sum(rid == victim for rid, _ in results) == 3
    for i in range(10):                                     # and the next 10 all succeed
        rid, r = _ask(client, f"after the failure {i}")
        assert rid != victim and r.choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 180                       # Ray Serve starts a replacement
    while len(scaled.replicas()) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(scaled.replicas()) == 2 and victim not in scaled.replicas()
