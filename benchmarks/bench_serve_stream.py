"""One stream through `isthmus serve` against the decode loop of `isthmus chat`, side by side.

    python benchmarks/bench_serve_stream.py [--tokens 128] [--rounds 4] [--target numba] [--model PATH]
    python benchmarks/bench_serve_stream.py --prefix [--rounds 4]
    python benchmarks/bench_serve_stream.py --chunked [--streams 8] [--tokens 128]
    python benchmarks/bench_serve_stream.py --tiers [--streams 32] [--max-batch 8]
    python benchmarks/bench_serve_stream.py --concurrent [--streams 8] [--tokens 64]

Both decode the same chat prompt greedily for exactly --tokens tokens (`ignore_eos`), and both
are timed the same way: tokens per second between the first token and the last one (so prompt
processing is left out of both). The chat side is `runtime.generate`'s loop (what `isthmus chat
--verbose` times: a `Sequence` stepped on `decoder.step` logits), run in a process of its own; the
serve side is `isthmus serve` as its own process, with the official `openai` client (asyncio,
streaming) in this process timing the SSE chunks as they arrive. The two take turns, --rounds
times, and the best round of each is reported with their ratio (the target of issue 16: >= 0.9).
A third side reads the same stream from a plain socket (no HTTP library: it counts the content
deltas in what each recv returns): on a machine whose cores the kernels all use, the client's
own CPU per token comes out of the server's decode, so the two serve sides tell the server's
cost from the official client's (each side's CPU per token is printed). The machine's load
average is printed with the figures.

--prefix measures conversation KV reuse instead (issue 16's target: the second turn of a 1,000-token
conversation within 1.5x the TTFT of a 20-token prompt): per round, a fresh ~1,000-token first
turn (16 tokens of reply), then its second turn (the first turn, the reply, a short question), a
~20-token prompt, and the same second turn with its first character changed (nothing to reuse:
the cold figure), each streamed, TTFT to the first text chunk; best and median of the rounds.

--chunked measures chunked prefill (the target: a 2,000-token prompt arriving while 8 streams run
leaves those streams' p99 inter-token latency <= 3x their median): --streams streams of --tokens
tokens start together; once all have their first token, a ~2,000-token prompt arrives; the gaps
between the streams' text chunks (from their first chunk on) are pooled, and their median, p90,
p99 and max are printed, with the long prompt's TTFT.

--concurrent measures batched decode (the target: 8 concurrent streams >= 4x one stream's rate;
32 streams all complete with exact token counts): per round, one stream alone, then --streams
streams started together, each rate the generated tokens over the time from the request(s) to the
last token (prompt processing included on both sides, alike); the token count of every stream is
checked. Both again with socket readers (threads) instead of the official client.

--tiers measures service tiers (the target: with a flex tenant saturating the server with 32
streams, priority requests keep p99 TTFT <= 2x their TTFT on an idle server): priority requests'
TTFT on the idle server, then --streams flex streams of --tokens tokens (the server run with
--max-batch; the streams from a process of their own, so that the probes' chunks do not wait
behind the load's parsing on one client event loop), and once they all run or wait, priority
requests one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

PROMPT = "Write a story about a cat who learns to sail."
ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")   # printed with the figures

CHAT = r"""
import json, sys, time
import isthmus
from isthmus.runtime.sampling import SamplingParams
from isthmus.runtime.sequence import Sequence
exe = isthmus.compile(isthmus.load(sys.argv[1]), target=sys.argv[2])
tok = exe.model.tokenizer
ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": sys.argv[4]}], add_generation_prompt=True))
n = int(sys.argv[3])
for line in sys.stdin:                     # one round per line
    seq = Sequence(SamplingParams(max_tokens=n, temperature=0.0), n, tokenizer=tok)
    decoder = exe.decoder()
    logits = decoder.step(ids)
    times = []
    while True:
        seq.step(logits)
        times.append(time.perf_counter())
        if seq.finish_reason:
            break
        logits = decoder.step([seq.token])
    print(json.dumps({"tokens": len(times), "rate": (len(times) - 1) / (times[-1] - times[0])}), flush=True)
"""


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _socket_stream(url: str, model: str, n: int, prompt: str) -> list[float]:
    """Stream one greedy reply of n tokens from a plain socket (no HTTP library): the time of each
    content delta, that of the recv whose bytes carry it (a recv holding several times them all;
    a delta may hold several tokens, as in `serve_round`); the token count is the usage's."""
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": n, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer bench\r\nContent-Length: %d\r\n\r\n" % (host.encode(), len(body)) + body)
        times, rest, tail = [], b"", b""
        while not tail.endswith(b"0\r\n\r\n"):          # the chunked body's last chunk
            d = s.recv(1 << 16)
            if not d:
                break
            events, _, rest = (rest + d).rpartition(b"\n\n")     # whole SSE events only
            k = events.count(b'"delta":{"content":"') - events.count(b'"delta":{"content":""')
            times += [time.perf_counter()] * k
            tail = (tail + d)[-200:]
    tokens = re.search(rb'"completion_tokens":(\d+)', tail)
    if not tokens or int(tokens.group(1)) != n:
        raise RuntimeError(f"the server returned {tokens and int(tokens.group(1))} tokens, not {n}")
    return times


def raw_round(url: str, model: str, n: int) -> dict:
    """`serve_round` read by `_socket_stream`."""
    t0, c0 = time.perf_counter(), _cpu_s()
    times = _socket_stream(url, model, n, PROMPT)
    return {"tokens": n, "ttft": times[0] - t0, "rate": (len(times) - 1) / (times[-1] - times[0]),
            "client_cpu": (_cpu_s() - c0) / n}


async def serve_round(url: str, model: str, n: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    try:
        t0, c0 = time.perf_counter(), _cpu_s()
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=n, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": PROMPT}])
        times, usage = [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            if any(c.delta.content for c in chunk.choices):
                times.append(time.perf_counter())
        cpu = _cpu_s() - c0
    finally:
        await client.close()
    tokens = usage.completion_tokens if usage else 0
    if tokens != n:
        raise RuntimeError(f"the server returned {tokens} tokens, not {n}")
    # chunks may carry more than one token (UTF-8 held back): the tokens between first and last chunk
    # are all but those of the first chunk; with one token per chunk (the usual case) it is n - 1
    return {"tokens": tokens, "chunks": len(times), "ttft": times[0] - t0,
            "rate": (tokens - (tokens - len(times) + 1)) / (times[-1] - times[0]), "client_cpu": cpu / tokens}


async def ttft(url: str, model: str, messages: list, n: int = 1) -> tuple[float, str]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    try:
        t0, first, text = time.perf_counter(), None, []
        stream = await client.chat.completions.create(model=model, temperature=0, max_tokens=n, stream=True,
                                                      messages=messages, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    first = first or time.perf_counter() - t0
                    text.append(c.delta.content)
    finally:
        await client.close()
    return first, "".join(text)


LONG = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
        "books were made and read across Europe. ")


def prefix_rounds(url: str, model: str, rounds: int) -> dict:
    rows = {"second turn (reused)": [], "20-token prompt": [], "second turn (cold)": []}
    for r in range(rounds):
        first = [{"role": "user", "content": f"Round {r}. " + LONG * 36 + " Summarise this."}]
        _, reply = asyncio.run(ttft(url, model, first, 16))
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say more."}]
        cold = [{"role": "user", "content": "X" + second[0]["content"][1:]}] + second[1:]
        rows["second turn (reused)"].append(asyncio.run(ttft(url, model, second))[0])
        rows["20-token prompt"].append(asyncio.run(ttft(url, model, [{"role": "user", "content": f"Hi {r}, how are you?"}]))[0])
        rows["second turn (cold)"].append(asyncio.run(ttft(url, model, cold))[0])
    return rows


async def chunked_round(url: str, model: str, streams: int, n: int, r: int = 0) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    started = asyncio.Event()
    firsts = [0]

    async def one(i):
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=n, stream=True, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Round {r}: write a story about the number {i}."}])
        times = []
        async for chunk in stream:
            if any(c.delta.content for c in chunk.choices):
                times.append(time.perf_counter())
                if len(times) == 1:
                    firsts[0] += 1
                    if firsts[0] == streams:
                        started.set()
        return times

    async def long_prompt():
        await started.wait()
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=4, stream=True, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Round {r}. " + LONG * 76 + " Summarise this."}])   # no reuse
        first = None
        async for chunk in stream:
            if first is None and any(c.delta.content for c in chunk.choices):
                first = time.perf_counter() - t0
        return t0, first

    try:
        *runs, (t_long, ttft_long) = await asyncio.gather(*(one(i) for i in range(streams)), long_prompt())
    finally:
        await client.close()
    gaps = sorted(b - a for times in runs for a, b in zip(times, times[1:]))
    during = sorted(b - a for times in runs for a, b in zip(times, times[1:]) if b > t_long)

    def q(xs, p):
        return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else float("nan")
    return {"median": q(gaps, 0.5), "p90": q(gaps, 0.9), "p99": q(gaps, 0.99), "max": gaps[-1],
            "gaps": len(gaps), "long_ttft": ttft_long, "median_after_long": q(during, 0.5)}


async def tiers_round(url: str, model: str, streams: int, n: int, probes: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    async def probe(i):
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=4, stream=True, service_tier="priority",
            messages=[{"role": "user", "content": f"Quick question {i}: what is {i} + {i}?"}])
        first = None
        async for chunk in stream:
            if first is None and any(c.delta.content for c in chunk.choices):
                first = time.perf_counter() - t0
        return first

    try:
        idle = [await probe(i) for i in range(probes)]
        # the flex load from a process of its own: on one event loop with the probes, their chunks
        # would wait behind the load's own parsing, which is the client's cost, not the server's
        load = subprocess.Popen([sys.executable, __file__, "--flex-load", url, model, str(streams), str(n)],
                                stdout=subprocess.PIPE, text=True)
        started = load.stdout.readline()              # "started" once every stream has its first chunk
        busy = [await probe(100 + i) for i in range(probes)]
        finished = load.communicate(timeout=600)[0]
    finally:
        await client.close()
    if not started.startswith("started") or load.returncode != 0:
        raise RuntimeError(f"the flex load failed: {started}{finished}")
    return {"idle": idle, "busy": busy}


async def flex_load(url: str, model: str, streams: int, n: int) -> None:
    """--tiers' load: `streams` flex streams of n tokens; prints "started" 2 s after sending them
    (every one then running or waiting in the server's queue), then waits for them all."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    async def flex(i):
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=n, stream=True, service_tier="flex",
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": f"Write about the number {i}."}])
        async for _ in stream:
            pass

    try:
        tasks = [asyncio.create_task(flex(i)) for i in range(streams)]
        await asyncio.sleep(2.0)
        print("started", flush=True)
        await asyncio.gather(*tasks)
    finally:
        await client.close()


async def concurrent_round(url: str, model: str, streams: int, n: int, r: int = 0) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    async def one(i):
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=n, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": f"Round {r}: a story about {i}."}])
        usage, last = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            if any(c.delta.content for c in chunk.choices):
                last = time.perf_counter()
        if usage is None or usage.completion_tokens != n:
            raise RuntimeError(f"stream {i} returned {usage and usage.completion_tokens} tokens, not {n}")
        return last

    try:
        t0 = time.perf_counter()
        lasts = await asyncio.gather(*(one(i) for i in range(streams)))
    finally:
        await client.close()
    return {"streams": streams, "rate": streams * n / (max(lasts) - t0)}


def socket_concurrent_round(url: str, model: str, streams: int, n: int, r: int = 0) -> dict:
    """`concurrent_round` with each stream read by `_socket_stream` on a thread of its own."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        lasts = list(pool.map(lambda i: _socket_stream(url, model, n, f"Round {r}: a story about {i}.")[-1],
                              range(streams)))
    return {"streams": streams, "rate": streams * n / (max(lasts) - t0)}


def ready(url: str) -> str:
    """Wait for the server at `url` (.../v1) to answer /health; the id of its model."""
    import httpx

    while True:
        try:
            if httpx.get(url[:-3] + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return httpx.get(url + "/models").json()["data"][0]["id"]


def start_server(model: str, target: str, *extra):
    cmd = [sys.executable, "-m", "isthmus.cli", "serve", "--model", model, "--target", target, "--port", "0",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"isthmus serve did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, m.group(0)


def main(argv=None) -> dict:
    # the client's garbage collector off, as timeit does: a full collection over the openai and
    # pydantic objects paused a client 20-55 ms inside whichever TTFT or chunk gap it fell in
    # (the figures measure the server, not the client; the load process's as well)
    import gc

    gc.disable()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flex-load"]:          # --tiers' load process
        url, model, streams, n = argv[1:5]
        asyncio.run(flex_load(url, model, int(streams), int(n)))
        return {}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--target", default="numba")
    p.add_argument("--model", default=None, help="a path (default: the pulled default model)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--prefix", action="store_true", help="measure conversation KV reuse (TTFT) instead")
    p.add_argument("--chunked", action="store_true", help="measure chunked prefill (inter-token latency) instead")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tiers", action="store_true", help="measure priority TTFT under a flex load instead")
    p.add_argument("--max-batch", type=int, default=8, help="--tiers: the server's --max-batch")
    p.add_argument("--concurrent", action="store_true", help="measure --streams concurrent streams' aggregate rate")
    args = p.parse_args(argv)
    if args.concurrent:
        return main_concurrent(args)
    if args.tiers:
        return main_tiers(args)
    if args.prefix:
        return main_prefix(args)
    if args.chunked:
        return main_chunked(args)
    from isthmus.models import pull

    model = args.model or str(pull(progress=False))
    chat = subprocess.Popen([sys.executable, "-c", CHAT, model, args.target, str(args.tokens), PROMPT],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc, url = start_server(model, args.target)
    rows = {"chat": [], "serve": [], "serve, socket reader": []}
    try:
        model_id = ready(url)
        asyncio.run(serve_round(url, model_id, 4))                         # warm-up: compile, bind
        raw_round(url, model_id, 4)
        chat.stdin.write("warm\n")
        chat.stdin.flush()
        json.loads(chat.stdout.readline())

        def chat_round():
            chat.stdin.write("go\n")
            chat.stdin.flush()
            return json.loads(chat.stdout.readline())

        sides = {"chat": chat_round, "serve": lambda: asyncio.run(serve_round(url, model_id, args.tokens)),
                 "serve, socket reader": lambda: raw_round(url, model_id, args.tokens)}
        for r in range(args.rounds):                                       # taking turns, each first in turn
            order = list(sides)[r % 3:] + list(sides)[:r % 3]
            for side in order:
                rows[side].append(sides[side]())
    finally:
        proc.terminate()
        chat.stdin.close()
        chat.wait(timeout=60)
        proc.wait(timeout=60)
    best = {k: max(r["rate"] for r in v) for k, v in rows.items()}
    median = {k: sorted(r["rate"] for r in v)[len(v) // 2] for k, v in rows.items()}
    load = os.getloadavg()
    out = {"tokens": args.tokens, "rounds": args.rounds, "target": args.target, "load": load,
           "best": best, "median": median, "ratio_best": best["serve"] / best["chat"],
           "ratio_median": median["serve"] / median["chat"],
           "ratio_best_socket": best["serve, socket reader"] / best["chat"],
           "ratio_median_socket": median["serve, socket reader"] / median["chat"], "rows": rows}
    env = {k: os.environ[k] for k in ENV if k in os.environ}
    out["env"] = env
    print(f"one stream, {args.tokens} tokens, target {args.target}, {args.rounds} rounds taking turns; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; env {env}")
    print("| side | best tokens/s | median tokens/s | each round | client CPU a token |")
    print("|---|---:|---:|---|---:|")
    for k in rows:
        each = " ".join(f"{r['rate']:.1f}" for r in rows[k])
        cpu = [r["client_cpu"] * 1e6 for r in rows[k] if "client_cpu" in r]
        cpu = f"{min(cpu):.0f}-{max(cpu):.0f} us" if cpu else ""
        print(f"| {k} | {best[k]:.1f} | {median[k]:.1f} | {each} | {cpu} |")
    print(f"serve / chat: best {out['ratio_best']:.2f}x, median {out['ratio_median']:.2f}x (official client); "
          f"{out['ratio_best_socket']:.2f}x, {out['ratio_median_socket']:.2f}x (socket reader); serve TTFT "
          f"{min(r['ttft'] for r in rows['serve']) * 1e3:.0f} ms (best)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main_prefix(args) -> dict:
    from isthmus.models import pull

    model = args.model or str(pull(progress=False))
    proc, url = start_server(model, args.target)
    try:
        model_id = ready(url)
        asyncio.run(ttft(url, model_id, [{"role": "user", "content": "warm up"}], 4))
        rows = prefix_rounds(url, model_id, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load = os.getloadavg()
    best = {k: min(v) for k, v in rows.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    print(f"TTFT, target {args.target}, {args.rounds} rounds; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| prompt | best TTFT | median TTFT | each round (ms) |")
    print("|---|---:|---:|---|")
    for k, v in rows.items():
        each = " ".join(f"{x * 1e3:.0f}" for x in v)
        print(f"| {k} | {best[k] * 1e3:.0f} ms | {median[k] * 1e3:.0f} ms | {each} |")
    short = "20-token prompt"
    print(f"second turn (reused) / 20-token prompt: best {best['second turn (reused)'] / best[short]:.2f}x, "
          f"median {median['second turn (reused)'] / median[short]:.2f}x; "
          f"cold / reused: median {median['second turn (cold)'] / median['second turn (reused)']:.1f}x")
    out = {"target": args.target, "rounds": args.rounds, "load": load, "ttft_s": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main_chunked(args) -> dict:
    from isthmus.models import pull

    model = args.model or str(pull(progress=False))
    proc, url = start_server(model, args.target)
    try:
        model_id = ready(url)
        asyncio.run(ttft(url, model_id, [{"role": "user", "content": "warm up"}], 4))
        rows = [asyncio.run(chunked_round(url, model_id, args.streams, args.tokens, r)) for r in range(args.rounds)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load = os.getloadavg()
    print(f"{args.streams} streams of {args.tokens} tokens, a ~2,000-token prompt arriving while they run; "
          f"target {args.target}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| round | ITL median | p90 | p99 | max | p99 / median | long prompt TTFT |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['median'] * 1e3:.0f} ms | {r['p90'] * 1e3:.0f} ms | {r['p99'] * 1e3:.0f} ms | "
              f"{r['max'] * 1e3:.0f} ms | {r['p99'] / r['median']:.2f}x | {r['long_ttft']:.2f} s |")
    out = {"target": args.target, "streams": args.streams, "tokens": args.tokens, "load": load, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main_tiers(args) -> dict:
    from isthmus.models import pull

    model = args.model or str(pull(progress=False))
    proc, url = start_server(model, args.target, "--max-batch", str(args.max_batch))
    try:
        model_id = ready(url)
        asyncio.run(ttft(url, model_id, [{"role": "user", "content": "warm up"}], 4))
        r = asyncio.run(tiers_round(url, model_id, args.streams, args.tokens, max(5, args.rounds)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load = os.getloadavg()

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]
    print(f"priority TTFT, idle and under {args.streams} flex streams of {args.tokens} tokens (--max-batch "
          f"{args.max_batch}), target {args.target}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| server | median | p99 | each (ms) |")
    print("|---|---:|---:|---|")
    for k in ("idle", "busy"):
        print(f"| {k} | {q(r[k], 0.5) * 1e3:.0f} ms | {q(r[k], 0.99) * 1e3:.0f} ms | "
              f"{' '.join(f'{x * 1e3:.0f}' for x in r[k])} |")
    print(f"busy p99 / idle median: {q(r['busy'], 0.99) / q(r['idle'], 0.5):.2f}x")
    out = {"target": args.target, "streams": args.streams, "max_batch": args.max_batch, "load": load, **r}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out



def main_concurrent(args) -> dict:
    from isthmus.models import pull

    model = args.model or str(pull(progress=False))
    proc, url = start_server(model, args.target, "--max-batch", str(max(args.streams, 8)))
    many, one_raw, many_raw = f"{args.streams} streams", "one stream, socket readers", f"{args.streams} streams, socket readers"
    rows = {"one stream": [], many: [], one_raw: [], many_raw: []}
    try:
        model_id = ready(url)
        asyncio.run(concurrent_round(url, model_id, 2, 4))                  # warm-up: compile, bind
        for r in range(args.rounds):
            rows["one stream"].append(asyncio.run(concurrent_round(url, model_id, 1, args.tokens, r))["rate"])
            rows[many].append(asyncio.run(concurrent_round(url, model_id, args.streams, args.tokens, r))["rate"])
            rows[one_raw].append(socket_concurrent_round(url, model_id, 1, args.tokens, r)["rate"])
            rows[many_raw].append(socket_concurrent_round(url, model_id, args.streams, args.tokens, r)["rate"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load = os.getloadavg()
    best = {k: max(v) for k, v in rows.items()}
    print(f"aggregate tokens/s, {args.tokens} tokens per stream, target {args.target}, {args.rounds} rounds; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| streams | best tokens/s | each round |")
    print("|---|---:|---|")
    for k, v in rows.items():
        print(f"| {k} | {best[k]:.1f} | {' '.join(f'{x:.1f}' for x in v)} |")
    ratio, ratio_raw = best[many] / best["one stream"], best[many_raw] / best[one_raw]
    print(f"{args.streams} streams / one: {ratio:.2f}x with the official client, {ratio_raw:.2f}x with socket "
          f"readers (every stream returned exactly {args.tokens} tokens)")
    out = {"rows": rows, "best": best, "ratio": ratio, "ratio_socket": ratio_raw, "load": load}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
