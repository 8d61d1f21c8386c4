"""Scale-out through Ray Serve: aggregate tokens/s with 1 and 2 replicas, and the router's overhead.

    python benchmarks/bench_ray_scale.py [--model smollm2-135m-instruct] [--target numba]
                                         [--streams 8] [--tokens 64] [--rounds 3] [--probes 200]

A local Ray (in a temporary directory, torn down at the end) runs `isthmus serve --replicas R`
joined to it, for R = 1 and 2, each as its own process like a user would run it:

* **throughput**: per round, --streams chat completions per replica at once (distinct
  conversations, so the affinity router spreads them), each exactly --tokens tokens (`ignore_eos`,
  greedy), through the official `openai` client; aggregate = all completion tokens / wall time of
  the round (prompt processing included). Each round is preceded by the same requests on a plain
  `isthmus serve` (one process, no Ray), so every figure has a reference taken under the same load
  (the machine is shared: absolute figures drift); median and range of the rounds, and the median
  ratio to the plain server.
* **router overhead**: the median latency of `GET /v1/models` (no generation: all that is left is
  the HTTP path) through `--replicas 1` (Serve proxy -> Router -> handle -> replica) minus the same
  on plain `isthmus serve` (uvicorn, one process), --probes sequential requests each after a warm-up.

From these, a model of scaling over machines (printed with its assumptions): each machine runs one
replica that owns all its cores, so a machine adds `per_replica` tokens/s; the single Router
replica forwards at most 1/overhead requests/s if its overhead were all its own CPU time (an upper
bound on its cost), so aggregate(M) ~= min(M * per_replica, tokens_per_request / overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`isthmus serve ...` as its own process, until stopped."""

    def __init__(self, args, extra: list[str]):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "import sys; from isthmus.cli import main; sys.exit(main())", "serve",
               "--model", args.model, "--target", args.target, "--model-id", "m", "--port", str(self.port),
               "--log-level", "warning", *extra]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited:\n{self.log.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up in 15 minutes")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)   # SIGINT may be ignored (a background job of a shell)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def probe_latency(url: str, n: int) -> float:
    """Median seconds of GET /v1/models, sequential, after a warm-up."""
    import httpx
    with httpx.Client(timeout=30) as c:
        for _ in range(20):
            c.get(url + "/v1/models")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(url + "/v1/models").raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def one_round(url: str, n: int, tokens: int, tag: str) -> tuple[float, int, dict]:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=900)

    async def one(i):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", temperature=0, max_tokens=tokens, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Story {tag}-{i}: write about a cat who learns to sail."}])
        return raw.headers.get("x-isthmus-replica", "-"), raw.parse().usage.completion_tokens

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    split: dict[str, int] = {}
    for rid, _ in got:
        split[rid] = split.get(rid, 0) + 1
    return wall, sum(t for _, t in got), split


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--target", default="numba")
    p.add_argument("--streams", type=int, default=8, help="concurrent requests per replica (default 8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", type=int, default=200, help="requests timed for the router overhead (default 200)")
    p.add_argument("--replicas", default="1,2", help="replica counts to measure (default 1,2)")
    p.add_argument("--replica-cpus", type=int, help="passed to isthmus serve (default: its own choice)")
    args = p.parse_args()

    # Ray runs its workers (the replicas) at nice 15 unless told otherwise: on a machine shared with
    # other work they would lose every contest for a core to the plain server's nice 0
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    tmp = tempfile.mkdtemp(prefix="isb", dir="/tmp")
    ray.init(_temp_dir=tmp, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    cores = os.cpu_count()
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f}; model {args.model} on {args.target}; "
          f"ray {ray.__version__}, RAY_worker_niceness={os.environ['RAY_worker_niceness']}", flush=True)
    results, reference = {}, {}
    try:
        plain = Server(args, [])             # one process, no Ray: the reference, measured in alternation
        asyncio.run(one_round(plain.url, 2, 4, "warm"))
        try:
            for r in [int(x) for x in args.replicas.split(",")]:
                cpus = ["--replica-cpus", str(args.replica_cpus)] if args.replica_cpus else []
                server = Server(args, ["--replicas", str(r), "--ray-address", address, *cpus])
                try:
                    if r == 1:
                        direct, via_ray = probe_latency(plain.url, args.probes), probe_latency(server.url, args.probes)
                    asyncio.run(one_round(server.url, 2 * r, 4, "warm"))      # every replica compiled and warm
                    for k in range(args.rounds):
                        wall, toks, _ = asyncio.run(one_round(plain.url, args.streams * r, args.tokens, f"p{r}.{k}"))
                        reference.setdefault(r, []).append(toks / wall)
                        wall, toks, split = asyncio.run(one_round(server.url, args.streams * r, args.tokens,
                                                                  f"{r}.{k}"))
                        results.setdefault(r, []).append(toks / wall)
                        print(f"  round {k}: {args.streams * r} requests: plain server {reference[r][-1]:.1f} "
                              f"tokens/s, {r} replica(s) {results[r][-1]:.1f} tokens/s (requests per replica "
                              f"{sorted(split.values())}); load average {os.getloadavg()[0]:.2f}", flush=True)
                finally:
                    server.stop()
                    from ray import serve
                    serve.shutdown()        # its proxy's port goes with it (the next run listens on another)
        finally:
            plain.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    overhead = via_ray - direct
    print(f"\nrouter overhead: GET /v1/models median {direct * 1e3:.2f} ms direct (uvicorn), "
          f"{via_ray * 1e3:.2f} ms through Ray Serve (proxy -> Router -> replica): +{overhead * 1e3:.2f} ms per request")
    print(f"aggregate throughput, {args.tokens}-token replies, prompt processing included (median [min-max] of "
          f"{args.rounds} rounds; each round of the plain server right before, same number of requests):")
    for r, rates in results.items():
        ratio = statistics.median(a / b for a, b in zip(rates, reference[r]))
        print(f"  {r} replica(s): {statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] tokens/s; "
              f"plain server {statistics.median(reference[r]):.1f} [{min(reference[r]):.1f}-{max(reference[r]):.1f}]; "
              f"ratio to plain (median of rounds) {ratio:.2f}")
    if 1 in results and overhead > 0:
        per = statistics.median(results[1])
        cap = args.tokens / overhead
        print(f"scaling model: aggregate(M machines, one replica each) ~= min(M x {per:.0f}, {cap:.0f}) tokens/s "
              f"(router cap = {args.tokens} tokens/request / {overhead * 1e3:.2f} ms, if that overhead were all "
              f"router CPU: past M ~= {cap / per:.0f} machines the one Router replica would be the limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
