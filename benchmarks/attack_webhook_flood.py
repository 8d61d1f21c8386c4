"""Issue 13, finding 5, replayed: one signed webhook POST with 3,000 messages against a live server,
while another tenant calls the Chat Completions API. Loopback only, the tiny chat model, bounded.

    python benchmarks/attack_webhook_flood.py [--messages 3000] [--seconds 30] [--api-clients 2]

Prints, for the flooding tenant: the POST's status and counts, replies sent, prompt tokens charged,
outbox backlog, messages lost (acknowledged but neither answered nor queued); for the other tenant:
its API calls' status codes and latency (p50, p99) before and during the flood. The flood tenant has
limits in the tenants file (requests_per_second, burst, tokens_per_minute); the webhook defaults
apply (backlog 256 per tenant, 4 turns at once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))


class Recorder:
    def __init__(self):
        self.sent = 0

    async def send_text(self, pnid, to, body):
        self.sent += 1

    async def aclose(self):
        pass


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def api_load(url, key, stop_at, clients):
    """`clients` loops of non-streaming completions (max_tokens 8) until `stop_at`: (latencies, statuses)."""
    lat, codes = [], {}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "temperature": 0}

    async def one(client):
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            lat.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
    return lat, codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the other tenant's load runs in each phase")
    ap.add_argument("--api-clients", type=int, default=2)
    args = ap.parse_args()

    import uvicorn
    from tiny_models import write_tiny_chat_gguf

    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key
    from isthmus.interop.webhook import WhatsAppAdapter, WhatsAppConfig, signature
    from isthmus.runtime.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="isthmus-flood-"))
    exe = isthmus.compile(isthmus.load(write_tiny_chat_gguf(tmp / "tiny-chat.gguf")), target="reference")
    secret, pnid, api_key = "flood-secret", "50005", "sk-api-tenant-0123456789"
    tenants = Tenants.from_config({"tenants": [
        {"id": "flood", "api_key_sha256": [hash_key("sk-flood-tenant-0123456789")],
         "requests_per_second": 5.0, "burst": 10, "tokens_per_minute": 20000},
        {"id": "api", "api_key_sha256": [hash_key(api_key)]}]})
    out = Recorder()
    adapter = WhatsAppAdapter(WhatsAppConfig(verify_token="v", app_secret=secret, phone_numbers={pnid: "flood"},
                                             max_tokens=16, temperature=0.0, outbox=str(tmp / "outbox.sqlite3")),
                              outbound=out)
    app = create_app({"tiny-chat": Engine(exe, name="tiny-chat")}, tenants=tenants, whatsapp=adapter)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)

    base_lat, base_codes = asyncio.run(api_load(url, api_key, time.monotonic() + args.seconds / 2, args.api_clients))

    now = str(int(time.time()))
    raw = json.dumps({"entry": [{"changes": [{"value": {"metadata": {"phone_number_id": pnid}, "messages": [
        {"from": f"1555{i % 50:07d}", "id": f"wamid.flood{i}", "timestamp": now, "type": "text",
         "text": {"body": f"message number {i}"}} for i in range(args.messages)]}}]}]}).encode()
    result = {}

    def flood():
        t0 = time.perf_counter()
        r = httpx.post(url + "/webhooks/whatsapp", content=raw, timeout=120,
                       headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature(secret, raw)})
        result.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - t0)

    flooder = threading.Thread(target=flood)
    flooder.start()
    lat, codes = asyncio.run(api_load(url, api_key, time.monotonic() + args.seconds, args.api_clients))
    flooder.join(timeout=120)

    metrics = app.state.isthmus.metrics.render()
    prompt = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("isthmus_prompt_tokens_total") and 'tenant="flood"' in line)
    body = result.get("body", {})
    accepted = body.get("accepted", 0)
    if result.get("status") == 503:
        accepted = int(re.search(r"\((\d+) accepted\)", body["error"]["message"]).group(1))
    pending = adapter.outbox.pending("flood")
    print(f"flood POST: {args.messages} messages in one signed POST -> HTTP {result.get('status')} "
          f"in {result.get('seconds', float('nan')):.2f} s: {json.dumps(body)[:200]}")
    print(f"flood tenant: accepted {accepted}, replies sent {out.sent} during {args.seconds:.0f} s, "
          f"still queued {pending}, lost {accepted - out.sent - pending}, prompt tokens charged {prompt:.0f}")
    print(f"api tenant before: {sum(base_codes.values())} calls {base_codes}, "
          f"p50 {pct(base_lat, 0.5) * 1000:.0f} ms, p99 {pct(base_lat, 0.99) * 1000:.0f} ms")
    print(f"api tenant during: {sum(codes.values())} calls {codes}, "
          f"p50 {pct(lat, 0.5) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms")
    server.should_exit = True
    thread.join(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
