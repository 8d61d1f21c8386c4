"""Chunked prefill (issue 16, item 4): a long prompt arriving while streams decode is prefilled in
parts between their decode steps, and its reply is the one it would get alone."""

from __future__ import annotations

import threading
import time

from isthmus.runtime import engine as engine_mod
from isthmus.runtime.engine import PREFILL_QUANTUM, Delta, Finished
from isthmus.runtime.sampling import SamplingParams

SHORT = [{"role": "user", "content": "Hello there"}]
LONG = [{"role": "user", "content": "Please read all of this carefully: " + "the quick brown fox jumps. " * 6}]


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny_chat, monkeypatch):
    log = []                    # (what, detail) in the engine thread's order
    real = engine_mod.prefill

    def prefill(exe, decoder, ids):
        log.append(("prefill", len(ids)))
        return real(exe, decoder, ids)

    monkeypatch.setattr(engine_mod, "prefill", prefill)
    engine = tiny_chat.engine(max_batch=4, max_waiting=8, prefill_tokens=PREFILL_QUANTUM)
    step = engine.decode

    def decode(exe, decoders, tokens):
        log.append(("step", len(decoders)))
        return step(exe, decoders, tokens)

    engine.decode = decode
    texts, done = {"short": [], "long": []}, threading.Event()
    finished = []

    def sink(name):
        def put(ev):
            if isinstance(ev, Delta):
                texts[name].append(ev.text)
                log.append(("delta", name))
            elif isinstance(ev, Finished):
                finished.append(name)
                if len(finished) == 2:
                    done.set()
        return put

    long_ids = tiny_chat.prompt_ids(LONG)
    assert len(long_ids) > 3 * PREFILL_QUANTUM
    engine.start()
    try:
        # long enough to outlast the long prompt's prefill on any machine (the tiny model decodes in ~1 ms)
        engine.submit(tiny_chat.prompt_ids(SHORT), SamplingParams(max_tokens=200, temperature=0), sink("short"),
                      ignore_eos=True)
        assert _wait(lambda: engine.steps >= 2)
        log.append(("submit", "long"))
        engine.submit(long_ids, SamplingParams(max_tokens=8, temperature=0), sink("long"))
        assert done.wait(60)
    finally:
        engine.stop()
    start = log.index(("submit", "long"))
    parts = [d for w, d in log[start:] if w == "prefill"]
    assert sum(parts) == len(long_ids) and len(parts) > 3 and all(p == PREFILL_QUANTUM for p in parts[:-1])
    end = max(i for i, e in enumerate(log) if e[0] == "prefill")
    between = [e for e in log[start:end] if e == ("step", 1)]
    assert len(between) >= len(parts) - 1          # the running stream stepped between every two parts
    assert "".join(texts["long"]) == tiny_chat.expected(LONG, max_tokens=8, temperature=0)[0]


def test_the_chunk_follows_the_measured_costs(tiny_chat):
    engine = tiny_chat.engine(prefill_tokens=512)
    assert engine._chunk() == 2 * PREFILL_QUANTUM                     # nothing measured yet
    engine._step_s, engine._token_s = 0.010, 0.001                      # a step = 10 prompt tokens
    assert engine._chunk() == PREFILL_QUANTUM                           # at least one quantum
    engine._step_s = 0.100                                              # a step = 100 prompt tokens
    assert engine._chunk() == 96
    engine.prefill_share = 2.0
    assert engine._chunk() == 192
    engine._step_s = 10.0
    assert engine._chunk() == 512                                       # never over prefill_tokens


def test_a_better_tier_prompt_is_not_chunked_for_worse_streams(tiny_chat, monkeypatch):
    log = []
    real = engine_mod.prefill
    monkeypatch.setattr(engine_mod, "prefill", lambda exe, d, ids: log.append(len(ids)) or real(exe, d, ids))
    engine = tiny_chat.engine(max_batch=4, max_waiting=8, prefill_tokens=512)
    engine._step_s, engine._token_s = 1e-4, 1e-3          # as measured: a chunk would be one quantum
    done = threading.Event()
    long_ids = tiny_chat.prompt_ids(LONG)
    engine.start()
    try:
        engine.submit(tiny_chat.prompt_ids(SHORT), SamplingParams(max_tokens=40, temperature=0), lambda ev: None,
                      ignore_eos=True, tier="flex")
        assert _wait(lambda: engine.steps >= 2)
        log.clear()
        engine.submit(long_ids, SamplingParams(max_tokens=2, temperature=0),
                      lambda ev: isinstance(ev, Finished) and done.set(), tier="priority")
        assert done.wait(30)
    finally:
        engine.stop()
    assert log[0] == len(long_ids)                         # one prefill, not chunks of 32
