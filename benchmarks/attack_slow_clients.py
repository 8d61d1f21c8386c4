"""The slow-client attack of issue 13 (finding 3), against a live `isthmus serve`, all on loopback.

    python benchmarks/attack_slow_clients.py [--single 3000] [--many 1500] [--seconds 15] [serve flags...]

Starts `isthmus serve` on 127.0.0.1 with the tiny test model (tests/support/tiny_models.py: the
attack is on connection handling, not the model) and its default limits unless flags are given
after the options, then opens `--single` half-open connections from 127.0.0.2 and one each from
`--many` other loopback addresses (127.0.3.1, ...), each sending a request head that never ends,
and keeps them for `--seconds`. Meanwhile it times GET /health and an authenticated chat completion
from 127.0.0.1 every 0.2 s, and reads the server's open connections from /metrics (admin key).
Prints the figures and the number of log lines the server wrote. Bounded: at most
single + many sockets, for `--seconds`; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

KEY, ADMIN = "sk-attack-tenant-0123456789", "sk-attack-admin-0123456789"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=3000, help="half-open connections from one address")
    ap.add_argument("--many", type=int, default=1500, help="addresses with one half-open connection each")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long the attack lasts")
    ap.add_argument("--verbose", action="store_true", help="print every probe")
    opts, serve_flags = ap.parse_known_args()
    from isthmus.interop.tenants import hash_key
    from tiny_models import write_tiny_chat_gguf

    tmp = Path(tempfile.mkdtemp(prefix="isthmus-attack-"))
    model = write_tiny_chat_gguf(tmp / "tiny-chat.gguf")
    tenants = tmp / "tenants.toml"
    tenants.write_text(f'[[tenants]]\nid = "t"\napi_key_sha256 = ["{hash_key(KEY)}"]\n'
                       f'[admin]\napi_key_sha256 = ["{hash_key(ADMIN)}"]\n')
    log = tmp / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "isthmus.cli", "serve", "--model", str(model), "--target",
                                 "reference", "--port", "0", "--tenants", str(tenants), "--log-level", "warning",
                                 *serve_flags], stderr=err)
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        port = int(m.group(1))
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        log_before = len(log.read_text().splitlines())
        client = httpx.Client(timeout=10)
        auth = {"Authorization": f"Bearer {KEY}"}
        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        def probe(samples):
            t0 = time.perf_counter()
            try:
                ok = httpx.get(url + "/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            t1 = time.perf_counter()
            try:
                ok2 = client.post(url + "/v1/chat/completions", json=chat, headers=auth).status_code == 200
            except httpx.HTTPError:
                ok2 = False
            samples.append((t1 - t0 if ok else None, time.perf_counter() - t1 if ok2 else None))
            if opts.verbose:
                print(f"  t={time.monotonic() - t_start:6.2f} s  sockets={len(socks)}  health={t1 - t0:.3f} s", file=sys.stderr)

        def open_conns() -> int:
            text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
            return int(float(re.search(r"^isthmus_open_connections (\S+)$", text, re.M).group(1)))

        samples: list = []
        peak, t_start = 0, time.monotonic()
        sources = ["127.0.0.2"] * opts.single + [f"127.0.{3 + i // 250}.{1 + i % 250}" for i in range(opts.many)]
        for i, src in enumerate(sources):
            c = socket.socket()
            c.setblocking(False)
            c.bind((src, 0))
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            socks.append(c)
            if i % 500 == 499:
                time.sleep(0.05)
                for s in socks[-500:]:
                    try:
                        s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                    except OSError:
                        pass
                probe(samples)
                peak = max(peak, open_conns())
        while time.monotonic() - t_start < opts.seconds:
            probe(samples)
            peak = max(peak, open_conns())
            time.sleep(0.2)
        alive = 0
        for s in socks:
            try:
                alive += bool(s.recv(1))    # b"": the server closed it
            except BlockingIOError:
                alive += 1                  # nothing to read and not closed: the server still holds it
            except OSError:
                pass
        health = [h for h, _ in samples if h is not None]
        chats = [c for _, c in samples if c is not None]
        grew = len(log.read_text().splitlines()) - log_before
        print(f"attack: {len(socks)} half-open connections ({opts.single} from one address, {opts.many} "
              f"from {opts.many} addresses) for {opts.seconds:g} s; serve flags: {' '.join(serve_flags) or 'defaults'}")
        print(f"server-side open connections: peak {peak}, at the end {open_conns()}; attacker sockets the server "
              f"still holds at the end: {alive}")
        print(f"/health: {len(health)}/{len(samples)} answered, median {statistics.median(health) * 1e3:.1f} ms, "
              f"max {max(health) * 1e3:.1f} ms")
        print(f"chat completion (max_tokens 2): {len(chats)}/{len(samples)} answered, median "
              f"{statistics.median(chats) * 1e3:.1f} ms, max {max(chats) * 1e3:.1f} ms")
        print(f"server log: {grew} lines during the attack")
        return 0
    finally:
        for s in socks:
            s.close()
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
