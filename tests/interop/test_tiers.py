"""Service tiers (`service_tier`: priority, default, flex): validation, tenants' defaults and
allowances, the tier echoed, admission and decode order, preemption that keeps the KV cache, and the
per-tier metrics. Issue 16, item 5."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from isthmus.errors import InputError

MODEL_ID = "tiny-chat"
KEYS = {"acme": "sk-tier-acme-0123456789", "admin": "sk-tier-admin-0123456789"}
USER = [{"role": "user", "content": "Hello there"}]
TIER_KEYS = {"vip": "sk-test-vip-0123456789", "bulk": "sk-test-bulk-0123456789"}


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _tenants():
    from isthmus.interop.tenants import Tenants, hash_key
    return Tenants.from_config({"tenants": [
        {"id": "acme", "api_key_sha256": [hash_key(KEYS["acme"])]},                       # default; may ask flex
        {"id": "vip", "api_key_sha256": [hash_key(TIER_KEYS["vip"])], "service_tier": "priority",
         "service_tiers": ["priority", "default", "flex"]},
        {"id": "bulk", "api_key_sha256": [hash_key(TIER_KEYS["bulk"])], "service_tier": "flex",
         "service_tiers": []},
    ], "admin": {"api_key_sha256": [hash_key(KEYS["admin"])]}})


@pytest.fixture(scope="module")
def tiered(live, tiny_chat):
    from isthmus.interop.app import create_app
    engine = tiny_chat.engine(max_batch=1, max_waiting=8)
    s = live.start(create_app({MODEL_ID: engine}, tenants=_tenants()))
    s.engine = engine
    yield s
    live.stop(s)


def _client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TIER_KEYS.get(key) or KEYS[key], max_retries=0,
                         timeout=60)


def test_the_tier_is_echoed_and_defaults_to_the_tenants(tiered):
    acme, vip, bulk = (_client(tiered, k) for k in ("acme", "vip", "bulk"))
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=3, temperature=0)
    assert acme.chat.completions.create(**kw).service_tier == "default"
    assert acme.chat.completions.create(**kw, service_tier="flex").service_tier == "flex"
    assert acme.chat.completions.create(**kw, service_tier="auto").service_tier == "default"
    assert vip.chat.completions.create(**kw).service_tier == "priority"
    assert vip.chat.completions.create(**kw, service_tier="flex").service_tier == "flex"
    assert bulk.chat.completions.create(**kw).service_tier == "flex"
    chunks = list(vip.chat.completions.create(**kw, stream=True, service_tier="default"))
    assert chunks and all(c.service_tier == "default" for c in chunks)


@pytest.mark.parametrize("key,tier", [("acme", "turbo"), ("acme", "priority"), ("bulk", "default"),
                                      ("acme", ""), ("acme", "PRIORITY")])
def test_an_unknown_or_forbidden_tier_is_a_400_naming_the_field(tiered, key, tier):
    with pytest.raises(openai.BadRequestError) as e:
        _client(tiered, key).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=3, service_tier=tier)
    assert e.value.body["param"] == "service_tier"


def test_a_tier_that_is_not_a_string_is_a_400_naming_the_field(tiered):
    import httpx
    r = httpx.post(tiered.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['acme']}"},
                   json={"model": MODEL_ID, "messages": USER, "service_tier": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


@pytest.mark.parametrize("entry,what", [({"service_tier": "gold"}, "service_tier"),
                                        ({"service_tiers": ["priority", "gold"]}, "service_tiers"),
                                        ({"service_tiers": "priority"}, "service_tiers")])
def test_the_tenants_file_names_a_bad_tier(entry, what):
    from isthmus.interop.tenants import Tenants
    with pytest.raises(InputError, match=what):
        Tenants.from_config({"tenants": [{"id": "t", "api_key_sha256": ["a" * 64], **entry}]})


def test_a_priority_request_preempts_flex_which_resumes_and_completes(tiered, tiny_chat):
    """max_batch 1: a flex stream runs; a priority request takes its slot at once (the flex stream
    pauses, keeping its KV cache) and finishes first; the flex stream then resumes and completes
    with the same text as if it had run alone."""
    engine = tiered.engine
    gate, entered, priority_done = threading.Event(), threading.Event(), threading.Event()
    real, start = engine.decode, engine.steps
    seen = []                                   # each step's first decoder: flex's, then priority's, ...

    def decode(exe, decoders, tokens):          # hold the flex stream after a few steps until priority waits
        if engine.steps == start + 2:
            entered.set()
            gate.wait(20)
        if seen and decoders[0] is seen[0] and seen[-1] is not seen[0]:
            # flex resumes after priority's steps: let priority's client finish reading its response
            # first, so the order below is the engine's, not the client threads' race for the GIL
            # (a flex stream never preempted does not wait, and the test fails)
            priority_done.wait(20)
        seen.append(decoders[0])
        return real(exe, decoders, tokens)

    want = tiny_chat.expected(USER, max_tokens=30, temperature=0)[0]
    done, errors = [], []

    def run(key, tier, max_tokens):
        try:
            r = _client(tiered, key).chat.completions.create(
                model=MODEL_ID, messages=USER, max_tokens=max_tokens, temperature=0, service_tier=tier)
            done.append((tier, r.choices[0].message.content, r.service_tier))
        except Exception as e:            # pragma: no cover - reported below
            errors.append(e)
        finally:
            if tier == "priority":
                priority_done.set()

    engine.decode = decode
    preemptions = engine.preemptions
    try:
        flex = threading.Thread(target=run, args=("acme", "flex", 30))
        flex.start()
        assert entered.wait(20)
        prio = threading.Thread(target=run, args=("vip", "priority", 4))
        prio.start()
        assert _wait(lambda: engine.waiting >= 1)
        gate.set()
        prio.join(30)
        flex.join(30)
    finally:
        engine.decode = real
        gate.set()
    assert not errors, errors
    assert [d[0] for d in done] == ["priority", "flex"]
    assert done[1][1] == want and done[1][2] == "flex"
    assert engine.preemptions == preemptions + 1


def test_preemption_keeps_the_kv_cache(tiny_chat, monkeypatch):
    """A paused sequence resumes without prefilling again: one prefill per sequence."""
    from isthmus.runtime import engine as engine_mod
    from isthmus.runtime.engine import Finished
    from isthmus.runtime.sampling import SamplingParams

    prefills = []
    real = engine_mod.prefill
    monkeypatch.setattr(engine_mod, "prefill", lambda exe, d, ids: prefills.append(len(ids)) or real(exe, d, ids))
    engine = tiny_chat.engine(max_batch=1, max_waiting=8)
    gate, entered, step = threading.Event(), threading.Event(), engine.decode

    def decode(exe, decoders, tokens):          # flex is held at its third step until priority waits
        if engine.steps == 2:
            entered.set()
            gate.wait(20)
        return step(exe, decoders, tokens)

    engine.decode = decode
    finished = []
    engine.submit(tiny_chat.prompt_ids(USER), SamplingParams(max_tokens=20, temperature=0),
                  lambda ev: isinstance(ev, Finished) and finished.append("flex"), tier="flex", ignore_eos=True)
    engine.start()
    try:
        assert entered.wait(20)
        engine.submit(tiny_chat.prompt_ids(USER), SamplingParams(max_tokens=2, temperature=0),
                      lambda ev: isinstance(ev, Finished) and finished.append("priority"), tier="priority")
        gate.set()
        assert _wait(lambda: len(finished) == 2)
    finally:
        gate.set()
        engine.stop()
    assert finished == ["priority", "flex"] and engine.preemptions == 1
    assert len(prefills) == 2


def test_admission_takes_the_best_tier_first(tiny_chat):
    from isthmus.runtime.engine import Delta
    from isthmus.runtime.sampling import SamplingParams

    engine = tiny_chat.engine(max_batch=1, max_waiting=8)
    engine.hold()
    engine.start()
    order = []
    try:
        for tier in ("flex", "default", "priority", "default"):
            engine.submit(tiny_chat.prompt_ids(USER), SamplingParams(max_tokens=2, temperature=0),
                          lambda ev, tier=tier: isinstance(ev, Delta) and tier not in order and order.append(tier),
                          tier=tier)
        with pytest.raises(InputError, match="service_tier"):
            engine.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None, tier="gold")
        engine.hold(False)
        assert _wait(lambda: engine.running == 0 and engine.waiting == 0)
    finally:
        engine.stop()
    assert order == ["priority", "default", "flex"]


def test_per_tier_metrics(tiered):
    import httpx
    _client(tiered, "bulk").chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4, temperature=0,
                                                    extra_body={"ignore_eos": True})
    text = httpx.get(tiered.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    for name in ("isthmus_tier_time_to_first_token_seconds_count", "isthmus_queue_seconds_count",
                 "isthmus_inter_token_latency_seconds_count", "isthmus_time_per_output_token_seconds_count",
                 "isthmus_decode_batch_size_by_tier_count"):
        line = next((ln for ln in text.splitlines() if ln.startswith(name) and 'tier="flex"' in ln), None)
        assert line is not None and float(line.split()[-1]) >= 1, name


def test_a_priority_request_gets_its_first_token_inside_a_running_decode_step(tiny_chat):
    """Numba target: a decode step has yield points (about once a layer) where a waiting request
    of a better tier than the whole batch is prefilled and sampled, its first token emitted before
    the step ends; it joins the batch at the next iteration, a flex sequence preempted for it, and
    every reply is what it would be alone."""
    import isthmus
    from isthmus.runtime.engine import Delta, Engine, Finished
    from isthmus.runtime.sampling import SamplingParams

    exe = isthmus.compile(tiny_chat.model, target="numba")
    prompt = tiny_chat.prompt_ids(USER)
    want_flex = "".join(isthmus.chat(exe, USER, max_tokens=12, temperature=0))
    want_prio = "".join(isthmus.chat(exe, USER, max_tokens=3, temperature=0))
    engine = Engine(exe, name=MODEL_ID, max_batch=2, max_waiting=8)
    real, held, steps = exe.decode_batch, threading.Event(), []

    def decode_batch(decoders, tokens, between=None):     # the first step of two flex streams stalls at a yield point
        def at_yield():
            if len(decoders) == 2 and not held.is_set():
                held.set()
                assert _wait(lambda: engine.waiting >= 1)
            between()
        t0 = time.perf_counter()
        out = real(decoders, tokens, at_yield if between is not None else None)
        steps.append((t0, time.perf_counter(), len(decoders)))
        return out

    exe.decode_batch = decode_batch
    texts, first, finished = {}, {}, []

    def sink(name):
        def on(ev):
            if isinstance(ev, Delta):
                first.setdefault(name, time.perf_counter())
                texts[name] = texts.get(name, "") + ev.text
            elif isinstance(ev, Finished):
                finished.append(name)
        return on

    engine.start()
    try:
        for name in ("flex0", "flex1"):
            engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0), sink(name), tier="flex")
        assert _wait(lambda: held.is_set())
        engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0), sink("priority"), tier="priority")
        assert _wait(lambda: len(finished) == 3, 60)
    finally:
        engine.stop()
        del exe.decode_batch
    stalled = next(s for s in steps if s[2] == 2)
    assert stalled[0] < first["priority"] < stalled[1]          # inside the step, not after it
    assert texts == {"flex0": want_flex, "flex1": want_flex, "priority": want_prio}
    assert engine.preemptions >= 1                              # the batch was over full by one
