"""Load: 32 concurrent streaming clients share the decode steps and each gets exactly its own reply."""

import asyncio
import time

import pytest

N_CLIENTS = 32
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def big_server(live, tiny_chat):
    from isthmus.interop.app import create_app

    engine = tiny_chat.engine(max_batch=32, max_waiting=64)
    sizes = []
    real = engine.decode

    def recording(exe, decoders, tokens):
        sizes.append(len(decoders))
        return real(exe, decoders, tokens)

    engine.decode = recording
    s = live.start(create_app({"tiny-chat": engine}))      # no tenants file: open, no keys
    s.engine, s.sizes = engine, sizes
    return s


def _conversation(i):
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Question {i}: " + "why " * (i % 7)}]


def test_32_concurrent_streams_all_complete_with_the_right_tokens(big_server, tiny_chat):
    expected = [tiny_chat.expected(_conversation(i), max_tokens=MAX_TOKENS) for i in range(N_CLIENTS)]
    client = big_server.async_client("anything")

    async def one(i):
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model="tiny-chat", messages=_conversation(i), temperature=0, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True})
        text, first, usage, finish = [], None, None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    first = first or time.perf_counter() - t0
                    text.append(c.delta.content)
                finish = c.finish_reason or finish
        return "".join(text), usage, finish, first

    async def all_clients():
        try:
            return await asyncio.gather(*(one(i) for i in range(N_CLIENTS)))
        finally:
            await client.close()

    big_server.sizes.clear()
    results = asyncio.run(all_clients())
    for i, ((text, usage, finish, _), (want, stats)) in enumerate(zip(results, expected)):
        assert text == want, i
        assert finish == stats.finish_reason, i
        assert usage.completion_tokens == stats.eval_tokens - (stats.finish_reason == "stop"), i
        assert usage.prompt_tokens == stats.prompt_tokens, i
    # the streams really shared decode steps
    assert max(big_server.sizes) >= 8
    assert len(big_server.sizes) < N_CLIENTS * MAX_TOKENS / 4
    assert big_server.engine.running == 0
