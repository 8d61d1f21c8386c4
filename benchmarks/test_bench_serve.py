"""Serving load benchmark: concurrent streaming clients against `isthmus serve` (continuous batching).

    pytest benchmarks/test_bench_serve.py -s -m slow                       # the default model, reference target
    ISTHMUS_BENCH_CONCURRENCY=1,8 ISTHMUS_BENCH_TOKENS=128 ISTHMUS_BENCH_REPEATS=3 pytest benchmarks/test_bench_serve.py -s -m slow

The server runs as its own process (`isthmus serve --port 0`), as in production, so the clients'
Python does not share its GIL; the clients are one asyncio process using the official `openai`
client. For each concurrency level it reports requests/s, p50/p99 time to first token (to the
first chunk that carries text), aggregate completion tokens/s end to end (prompt processing
included: all clients start together, so the prefills queue up front) and the decode throughput
(each stream's tokens after its first, over the time they took, summed), each against one client.
Levels run interleaved, REPEATS times, and the best run of each level is reported (the machine
may be shared). Every request asks for `ignore_eos` (an extension, as in vLLM) and must return exactly max_tokens
tokens, or the run fails.
`ISTHMUS_BENCH_OUT=file.json` also writes the figures as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import pytest

TARGET = os.environ.get("ISTHMUS_BENCH_TARGET", "reference")
LEVELS = [int(x) for x in os.environ.get("ISTHMUS_BENCH_CONCURRENCY", "1,8,32").split(",")]
MAX_TOKENS = int(os.environ.get("ISTHMUS_BENCH_TOKENS", "32"))
REPEATS = int(os.environ.get("ISTHMUS_BENCH_REPEATS", "2"))


def _percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_level(base_url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=3600)

    async def one(i):
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},          # every request generates exactly max_tokens
            messages=[{"role": "user", "content": f"Write one sentence about the number {i}."}])
        ttft, last, usage, finish = None, None, None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                if c.delta.content:
                    last = time.perf_counter() - t0
                    ttft = last if ttft is None else ttft
                finish = c.finish_reason or finish
        ok = usage is not None and usage.completion_tokens == max_tokens and finish == "length"
        tokens = usage.completion_tokens if usage else 0
        decode_rate = (tokens - 1) / (last - ttft) if ttft is not None and last > ttft else 0.0
        return {"ttft": ttft, "tokens": tokens, "ok": ok, "decode_rate": decode_rate,
                "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": concurrency, "all_ok": all(r["ok"] for r in results),
            "wall_s": wall, "requests_per_s": concurrency / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            # after its first token, each stream's own rate; summed, the batch's decode throughput
            "decode_tokens_per_s": sum(r["decode_rate"] for r in results)}


def start_server(model: str, target: str):
    cmd = [sys.executable, "-m", "isthmus.cli", "serve", "--model", model, "--target", target, "--port", "0",
           "--max-batch", "32", "--max-waiting", "64", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"isthmus serve did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, m.group(0)


def report(rows: list[dict]) -> str:
    base = next((r for r in rows if r["concurrency"] == 1), rows[0])
    lines = ["| clients | requests/s | TTFT p50 | TTFT p99 | tokens/s, end to end | vs 1 client "
             "| decode tokens/s | vs 1 client |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests_per_s']:.3f} | {r['ttft_p50_s']:.2f} s | "
                     f"{r['ttft_p99_s']:.2f} s | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                     f"| {r['decode_tokens_per_s']:.2f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def default_model_path():
    from isthmus.models import pull
    return pull(progress=False)


@pytest.mark.slow
def test_serving_load(default_model_path):
    import httpx

    proc, url = start_server(str(default_model_path), TARGET)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url[:-3] + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        model = httpx.get(url + "/models").json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 2))                      # warm-up
        # levels interleaved, best of REPEATS each: the machine may be shared, and its load drifts
        runs = [asyncio.run(run_level(url, model, c, MAX_TOKENS)) for _ in range(REPEATS) for c in LEVELS]
        rows = [max((r for r in runs if r["concurrency"] == c), key=lambda r: r["tokens_per_s"]) for c in LEVELS]
        for c in LEVELS:
            rows[LEVELS.index(c)]["all_ok"] = all(r["all_ok"] for r in runs if r["concurrency"] == c)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    print(f"\nserving {default_model_path.name} on target {TARGET}, {MAX_TOKENS} tokens per request, "
          f"best of {REPEATS}, env {env}")
    print(report(rows))
    if os.environ.get("ISTHMUS_BENCH_OUT"):
        with open(os.environ["ISTHMUS_BENCH_OUT"], "w") as f:
            json.dump({"target": TARGET, "max_tokens": MAX_TOKENS, "env": env, "rows": rows}, f, indent=2)
    assert all(r["all_ok"] for r in rows), rows
