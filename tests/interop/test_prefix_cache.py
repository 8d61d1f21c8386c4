"""Prefix / conversation KV reuse (runtime/prefix_cache.py, issue 16 item 3): a prompt that extends
an earlier request's reuses that decoder's KV cache for the shared prefix, gives the same reply as a
cold run at temperature 0, and never crosses tenants."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from isthmus.runtime.prefix_cache import PrefixCache, block_hashes

MODEL_ID = "tiny-chat"
KEYS = {"acme": "sk-prefix-acme-0123456789", "other": "sk-prefix-other-0123456789"}
FIRST = [{"role": "user", "content": "Tell me about the sea."}]


class _Decoder:
    """A stand-in with the in-place cache shape kvstate understands."""

    def __init__(self, length, capacity=4096):
        self.caches = {0: (np.zeros((1, 1, capacity, 2), np.float32), np.zeros((1, 1, capacity, 2), np.float32))}
        self.capacity, self.length = capacity, length


def test_block_hashes_chain():
    a, b = list(range(40)), list(range(40))
    b[3] = 99
    assert block_hashes(a, 16) != block_hashes(b, 16)
    assert len(block_hashes(a, 16)) == 2 and block_hashes(a[:32], 16) == block_hashes(a, 16)
    assert block_hashes(a[:16], 16)[0] == block_hashes(a, 16)[0]


def test_take_finds_the_longest_prefix_of_the_same_tenant_only():
    cache = PrefixCache(1 << 30, block=4)
    old = list(range(100, 140))
    d = _Decoder(len(old))
    assert cache.put("acme", old, d)
    assert cache.take("other", old + [1, 2]) is None                   # never across tenants
    assert cache.take("acme", [5] + old) is None                        # not a prefix
    got = cache.take("acme", old[:30] + [7, 8, 9])
    assert got is not None and got[0] is d and got[1] == 30 and d.length == 30
    assert len(cache) == 0                                              # taken: one owner at a time
    d2 = _Decoder(len(old))
    cache.put("acme", old, d2)
    decoder, n = cache.take("acme", old)                               # the same prompt: all but the last
    assert decoder is d2 and n == len(old) - 1


def test_a_shared_prefix_is_copied_and_stays_for_the_next_prompt():
    """A hit on part of an entry (a system prompt many conversations share) copies that part's
    positions into a fresh decoder and leaves the entry; a hit on (nearly) all of it takes it."""
    rng = np.random.default_rng(0)
    cache = PrefixCache(1 << 30, block=4)
    shared, old = list(range(100, 120)), list(range(100, 120)) + list(range(500, 520))
    d = _Decoder(len(old))
    for a in d.caches[0]:
        a[:, :, :len(old)] = rng.standard_normal((1, 1, len(old), 2))
    before = [a.copy() for a in d.caches[0]]
    assert cache.put("acme", old, d)
    for tail in ([1, 2, 3], [7, 8]):                                    # two conversations, one prefix
        got, n = cache.take("acme", shared + tail, fresh=lambda: _Decoder(0))
        assert got is not d and n == len(shared) and got.length == n
        for a, b in zip(got.caches[0], before):
            assert np.array_equal(a[:, :, :n], b[:, :, :n])
        assert len(cache) == 1                                          # still there for the next
    assert all(np.array_equal(a, b) for a, b in zip(d.caches[0], before)) and d.length == len(old)
    got, n = cache.take("acme", old[:-2] + [9], fresh=lambda: _Decoder(0))   # all but 2: a next turn
    assert got is d and n == len(old) - 2 and len(cache) == 0


def test_the_budget_drops_the_least_recently_used():
    per_position = 2 * 2 * 4                # K and V, 2 values, float32
    cache = PrefixCache(per_position * 100, block=4)
    a, b, c = ([k] * 40 for k in (1, 2, 3))
    for t in (a, b):
        assert cache.put("acme", t, _Decoder(40))
    assert cache.put("acme", c, _Decoder(40))                          # 120 positions > 100: a goes
    assert cache.used == per_position * 80 and len(cache) == 2
    assert cache.take("acme", a + [5]) is None
    assert cache.take("acme", b + [5]) is not None
    assert not cache.put("acme", [4] * 101, _Decoder(101))             # larger than the whole budget
    assert not cache.put("acme", [4] * 10, _Decoder(11))               # the cache holds other positions


@pytest.fixture(scope="module")
def cached(live, tiny_chat):
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key

    tenants = Tenants.from_config({"tenants": [{"id": k, "api_key_sha256": [hash_key(v)]} for k, v in KEYS.items()]})
    engine = tiny_chat.engine(max_batch=4, max_waiting=8, prefix_cache_bytes=64 << 20)
    s = live.start(create_app({MODEL_ID: engine}, tenants=tenants))
    s.engine = engine
    yield s
    live.stop(s)


def _client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[key], max_retries=0, timeout=60)


def _ask(server, key, messages, stream=False):
    c = _client(server, key)
    kw = dict(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    if stream:
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                       if ch.choices)
    return c.chat.completions.create(**kw).choices[0].message.content


def test_a_second_turn_reuses_the_first_and_answers_as_a_cold_run(cached, tiny_chat):
    cache = cached.engine.prefix_cache
    cache.clear()
    first = _ask(cached, "acme", FIRST)
    assert first == tiny_chat.expected(FIRST, max_tokens=12, temperature=0)[0]
    second = FIRST + [{"role": "assistant", "content": first},
                      {"role": "user", "content": "And the ships?"}]
    hits, reused = cache.hits, cache.reused_tokens
    got = _ask(cached, "acme", second, stream=True)
    assert cache.hits == hits + 1
    n_first = len(tiny_chat.prompt_ids(FIRST))
    assert cache.reused_tokens - reused >= n_first            # at least the first turn's prompt was not prefilled
    assert got == tiny_chat.expected(second, max_tokens=12, temperature=0)[0]
    third = second + [{"role": "assistant", "content": got}, {"role": "user", "content": "Thanks!"}]
    assert _ask(cached, "acme", third) == tiny_chat.expected(third, max_tokens=12, temperature=0)[0]
    assert cache.hits == hits + 2


def test_conversations_sharing_a_system_prompt_all_reuse_it_and_answer_as_cold_runs(cached, tiny_chat):
    """Two conversations admitted together after a third with the same system prompt: both reuse
    its positions (a copy each; taking the entry would leave the second to a cold prefill)."""
    import threading
    import time

    cache, engine = cached.engine.prefix_cache, cached.engine
    cache.clear()
    system = {"role": "system", "content": "You are a patient guide to the harbour. " * 3}
    convs = [[system, {"role": "user", "content": q}] for q in ("Where are the boats?", "When is high tide?",
                                                                 "Who keeps the lighthouse?")]
    assert _ask(cached, "acme", convs[0]) == tiny_chat.expected(convs[0], max_tokens=12, temperature=0)[0]
    hits, reused = cache.hits, cache.reused_tokens
    got = {}
    engine.hold(True)                     # both wait, then are admitted in the same iteration
    try:
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _ask(cached, "acme", convs[i])))
                   for i in (1, 2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while engine.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.waiting == 2
    finally:
        engine.hold(False)
    for t in threads:
        t.join(60)
    for i in (1, 2):
        assert got[i] == tiny_chat.expected(convs[i], max_tokens=12, temperature=0)[0]
    shared = len(tiny_chat.prompt_ids([system]))
    assert cache.hits == hits + 2 and cache.reused_tokens - reused >= 2 * (shared - 16)


def test_the_same_prompt_again_reuses_all_but_its_last_token(cached, tiny_chat):
    cache = cached.engine.prefix_cache
    cache.clear()
    want = tiny_chat.expected(FIRST, max_tokens=12, temperature=0)[0]
    assert _ask(cached, "acme", FIRST) == want
    reused = cache.reused_tokens
    assert _ask(cached, "acme", FIRST) == want
    assert cache.reused_tokens - reused == len(tiny_chat.prompt_ids(FIRST)) - 1


def test_the_cache_never_crosses_tenants(cached, tiny_chat):
    cache = cached.engine.prefix_cache
    cache.clear()
    first = _ask(cached, "acme", FIRST)
    second = FIRST + [{"role": "assistant", "content": first}, {"role": "user", "content": "Go on."}]
    hits, misses = cache.hits, cache.misses
    assert _ask(cached, "other", second) == tiny_chat.expected(second, max_tokens=12, temperature=0)[0]
    assert (cache.hits, cache.misses) == (hits, misses + 1)           # acme's entry was there, and not used
    assert _ask(cached, "other", second) == tiny_chat.expected(second, max_tokens=12, temperature=0)[0]
    assert cache.hits == hits + 1                                      # ... other's own entry was
    import httpx
    text = httpx.get(cached.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['other']}"}).text
    assert 'isthmus_prefix_cache_lookups_total{model="tiny-chat",outcome="hit",tenant="other",tier="default"} 1' in text
    assert 'tenant="acme"' not in text


def test_reuse_on_the_numba_target_matches_a_cold_run(tiny_chat):
    """The default target's in-place cache, truncated and extended, answers as a fresh decoder."""
    import threading

    import isthmus
    from isthmus.runtime.engine import Delta, Engine, Finished
    from isthmus.runtime.sampling import SamplingParams

    exe = isthmus.compile(tiny_chat.model, target="numba")
    engine = Engine(exe, name=MODEL_ID, prefix_cache_bytes=64 << 20).start()

    def run(messages):
        out, done = [], threading.Event()
        engine.submit(tiny_chat.prompt_ids(messages), SamplingParams(max_tokens=16, temperature=0),
                      lambda ev: out.append(ev.text) if isinstance(ev, Delta) else
                      isinstance(ev, Finished) and done.set())
        assert done.wait(60)
        return "".join(out)

    try:
        first = run(FIRST)
        second = FIRST + [{"role": "assistant", "content": first}, {"role": "user", "content": "More."}]
        got = run(second)
        assert engine.prefix_cache.hits == 1
    finally:
        engine.stop()
    assert first == "".join(isthmus.chat(exe, FIRST, max_tokens=16, temperature=0))
    assert got == "".join(isthmus.chat(exe, second, max_tokens=16, temperature=0))
