"""The default model (SmolLM2-135M-Instruct) behind the server on the reference target: concurrent
batched replies equal the unbatched ones from `isthmus.chat`, token for token."""

import asyncio

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Say hello in Spanish.", "What do bees make?", "Name a planet."]


def test_concurrent_replies_equal_unbatched_ones(live, default_exe):
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.runtime.engine import Engine

    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    want = ["".join(isthmus.chat(default_exe, c, max_tokens=16)) for c in convs]
    engine = Engine(default_exe, name="smollm2-135m-instruct", max_batch=8)
    sizes = []
    real = engine.decode
    engine.decode = lambda exe, ds, ts: sizes.append(len(ds)) or real(exe, ds, ts)
    s = live.start(create_app(engine))
    try:
        client = s.async_client("open")

        async def one(c):
            r = await client.chat.completions.create(model="smollm2-135m-instruct", messages=c, max_tokens=16,
                                                     temperature=0)
            return r.choices[0].message.content

        async def main():
            # admitted together (held until all six wait): a prompt read in parts while the first
            # ones decode would otherwise join after some have finished
            engine.hold()
            try:
                tasks = [asyncio.ensure_future(one(c)) for c in convs]
                for _ in range(600):
                    if engine.waiting == len(convs):
                        break
                    await asyncio.sleep(0.01)
                engine.hold(False)
                return await asyncio.gather(*tasks)
            finally:
                engine.hold(False)
                await client.close()

        got = asyncio.run(main())
    finally:
        live.stop(s)
    assert got == want
    assert max(sizes) == len(QUESTIONS)
    assert "Paris" in got[0]
