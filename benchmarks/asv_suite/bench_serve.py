"""Serving on loopback: requests per second and time to first token of `concurrency` streaming
Chat Completions at once, each asking for 16 tokens (`ignore_eos`, so every reply has 16).

The app is `isthmus serve`'s (interop.app.create_app over one Engine), under uvicorn on a free
127.0.0.1 port in a thread of this process; the clients are httpx on an asyncio loop in the main
thread. Models: `tiny` is the serving tests' 2-layer random chat model (tests/support/tiny_models.py)
on the reference target, so its figures are the serving stack's own cost (HTTP, SSE, scheduler,
tokenizer); the default model (n/a until `isthmus pull`) runs on the default CPU target.
benchmarks/test_bench_serve.py is the heavier load test with the server in its own process.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = ["tiny", "smollm2-135m-instruct"]
CONCURRENCY = [1, 8]
MAX_TOKENS = 16


TESTS = Path(__file__).resolve().parents[2] / "tests"


@functools.cache
def _serving_tests():
    """tests/interop/conftest.py (the in-process uvicorn server) and tests/support/tiny_models.py
    (the tiny chat model), importable as pytest makes them."""
    sys.path.insert(0, str(TESTS / "support"))
    spec = importlib.util.spec_from_file_location("_interop_conftest", TESTS / "interop" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest


@functools.cache
def _executable(model: str):
    import isthmus
    from isthmus.models import is_pulled, pull

    if model == "tiny":
        folder = tempfile.TemporaryDirectory(prefix="isthmus-bench-")   # lives as long as the cache
        path = _serving_tests().write_tiny_chat_gguf(Path(folder.name) / "tiny-chat.gguf")
        return folder, isthmus.compile(isthmus.load(path), target="reference")
    if not is_pulled(model):
        raise NotImplementedError(f"{model} is not pulled (isthmus pull)")
    return None, isthmus.compile(isthmus.load(pull(model, progress=False)))


async def _one(client, i: int) -> float:
    """Time to the first chunk carrying text, after reading the whole stream."""
    body = {"model": "bench", "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}]}
    t0, ttft = time.perf_counter(), None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("a stream carried no text")
    return ttft


async def _round(url: str, concurrency: int) -> tuple[float, list[float]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        ttfts = await asyncio.gather(*(_one(client, i) for i in range(concurrency)))
        return time.perf_counter() - t0, ttfts


class Serve:
    params = [MODELS, CONCURRENCY]
    param_names = ["model", "concurrency"]
    timeout = 300

    def setup(self, model, concurrency):
        from isthmus.interop.app import create_app
        from isthmus.runtime.engine import Engine

        exe = _executable(model)[1]
        self.server = _serving_tests().LiveServer(
            create_app({"bench": Engine(exe, name="bench", max_batch=max(CONCURRENCY))}))
        self.url = self.server.url
        asyncio.run(_round(self.url, 1))            # warm: the first request binds the decoder

    def teardown(self, model, concurrency):
        self.server.stop()

    def track_requests_per_second(self, model, concurrency):
        wall, _ = asyncio.run(_round(self.url, concurrency))
        return concurrency / wall

    track_requests_per_second.unit = "requests/s"

    def track_time_to_first_token(self, model, concurrency):
        _, ttfts = asyncio.run(_round(self.url, concurrency))
        return statistics.median(ttfts)

    track_time_to_first_token.unit = "seconds"
