"""Batch-invariant serving (issue 16, item 6), against a live server with the official openai
client: with `compile(..., batch_invariant=True)` a request's reply and its logprobs are bitwise
those it gets on an idle server, while other streams share its decode steps and its prompt is read
in parts between theirs (here at temperature 0 and with a seed)."""

from __future__ import annotations

import asyncio

import pytest

from isthmus.runtime import engine as engine_mod
from isthmus.runtime.engine import PREFILL_QUANTUM

MODEL_ID = "tiny-chat"
LONG = [{"role": "user", "content": "Please read all of this carefully: " + "the quick brown fox jumps. " * 6}]
SHORT = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("target", ["numba", "reference"])
def test_a_reply_under_load_is_bitwise_the_idle_one(live, tiny_chat, target, monkeypatch, tmp_path):
    pytest.importorskip("numba")
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.runtime.engine import Engine
    from tiny_models import write_tiny_chat_gguf    # tests/support

    # the tiny chat model with room for streams that outlast the measured request
    model = isthmus.load(write_tiny_chat_gguf(tmp_path / "tiny-chat.gguf", context_length=2048))
    exe = isthmus.compile(model, target=target, batch_invariant=True)
    engine = Engine(exe, name=MODEL_ID, max_batch=8, prefill_tokens=512)
    parts, sizes = [], []
    real_prefill, real_decode = engine_mod.prefill, engine.decode
    monkeypatch.setattr(engine_mod, "prefill", lambda e, d, ids: parts.append(len(ids)) or real_prefill(e, d, ids))
    engine.decode = lambda e, ds, ts: sizes.append(len(ds)) or real_decode(e, ds, ts)
    assert len(tiny_chat.prompt_ids(LONG)) > 3 * PREFILL_QUANTUM
    s = live.start(create_app({MODEL_ID: engine}))
    try:
        client = s.async_client("open")
        asks = [dict(temperature=0), dict(temperature=0.9, seed=11)]

        async def ask(kw):
            r = await client.chat.completions.create(model=MODEL_ID, messages=LONG, max_tokens=10, logprobs=True,
                                                     **kw)
            return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

        async def load():
            await client.chat.completions.create(model=MODEL_ID, messages=SHORT, max_tokens=1900, temperature=0,
                                                 extra_body={"ignore_eos": True})

        async def main():
            idle = [await ask(kw) for kw in asks]
            idle_parts = list(parts)
            busy = []
            for kw in asks:
                streams = [asyncio.ensure_future(load()) for _ in range(3)]
                for _ in range(2000):              # until the three decode together
                    if len(engine._running) == 3 and all(not q.todo for q in engine._running):
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError("the three streams did not start")
                busy.append(await ask(kw))
                for t in streams:
                    t.cancel()
                await asyncio.gather(*streams, return_exceptions=True)
                for _ in range(2000):              # the cancelled streams gone before the next round
                    if not engine._running:
                        break
                    await asyncio.sleep(0.005)
            await client.close()
            return idle, idle_parts, busy

        idle, idle_parts, busy = asyncio.run(main())
    finally:
        live.stop(s)
    assert len(idle[0]) == 10
    assert idle == busy
    long_n = len(tiny_chat.prompt_ids(LONG))
    assert idle_parts[:1] == [long_n]                        # idle: the prompt read in one part
    busy_parts = parts[len(idle_parts):]                  # busy: in parts between the streams' steps
    assert long_n not in busy_parts and any(p % PREFILL_QUANTUM == 0 and p < long_n for p in busy_parts)
    assert max(sizes) >= 4                                   # and decoded in batches with the streams
