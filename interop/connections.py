"""Connection limits and read timeouts against slow clients, and rate-limited logs.

uvicorn closes idle keep-alive connections but has no timeout for a request head, so a client that
opens connections and sends a partial header (or nothing) holds them forever, until the process
runs out of file descriptors. `ConnectionGuard` wraps uvicorn's HTTP protocol class (only the
`asyncio.Protocol` methods `connection_made` / `connection_lost`, so it fits h11 and httptools):

* at most `max_per_client` open connections per client address: one more is closed at once;
* at most `max_connections` in all: when full, a new connection evicts the connection that has
  waited longest for a request head (a slow or idle client); only if every connection is busy
  with a request is the new one closed instead;
* a request head must arrive within `header_timeout` seconds of the connection opening (or of
  the previous response ending), else the connection is closed.

The application's ASGI `Guard` (interop/app.py) tells the guard when a request starts and ends,
and enforces the body timeout (408) as it reads the body. `uvicorn_config(app)` builds the
uvicorn config with all of this; `isthmus serve` and the tests use it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("isthmus.serve")


@dataclass(eq=False)
class _Conn:
    protocol: object
    client: tuple | None           # (host, port) as uvicorn puts it in the ASGI scope
    host: str
    busy: int = 0                  # requests in flight on this connection
    timer: object = None


class ConnectionGuard:
    def __init__(self, max_connections: int = 1000, max_per_client: int = 100, header_timeout: float = 10.0,
                 metrics=None):
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.header_timeout, self.metrics = header_timeout, metrics
        self._by_protocol: dict[object, _Conn] = {}
        self._by_client: dict[tuple, _Conn] = {}
        self._per_host: collections.Counter = collections.Counter()
        self._idle: collections.OrderedDict = collections.OrderedDict()   # waiting for a request head, oldest first

    @property
    def open(self) -> int:
        return len(self._by_protocol)

    def _closed(self, reason: str, host: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.inc(reason=reason)
        log.warning("closed a connection from %s: %s", host, reason)

    # -- called by the protocol (event loop) ---------------------------------------------------------

    def opened(self, protocol, transport) -> bool:
        from uvicorn.protocols.utils import get_remote_addr
        client = get_remote_addr(transport)
        host = client[0] if client else "local"
        if self.max_per_client and self._per_host[host] >= self.max_per_client:
            self._closed("per_client_limit", host)
            return False
        if self.max_connections and len(self._by_protocol) >= self.max_connections:
            if not self._idle:
                self._closed("connection_limit", host)
                return False
            oldest = next(iter(self._idle.values()))
            self._closed("evicted_idle", oldest.host)
            self._drop(oldest)
            oldest.protocol.transport.close()
        c = _Conn(protocol, client, host)
        self._by_protocol[protocol] = c
        if client is not None:
            self._by_client[client] = c
        self._per_host[host] += 1
        self._wait_for_head(c)
        return True

    def lost(self, protocol) -> None:
        c = self._by_protocol.get(protocol)
        if c is not None:
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        if self._by_protocol.pop(c.protocol, None) is None:
            return
        if c.client is not None and self._by_client.get(c.client) is c:
            del self._by_client[c.client]
        self._per_host[c.host] -= 1
        if self._per_host[c.host] <= 0:
            del self._per_host[c.host]
        self._idle.pop(c.protocol, None)
        if c.timer is not None:
            c.timer.cancel()

    def _wait_for_head(self, c: _Conn) -> None:
        import asyncio
        self._idle[c.protocol] = c
        self._idle.move_to_end(c.protocol)
        if self.header_timeout:
            c.timer = asyncio.get_running_loop().call_later(self.header_timeout, self._expired, c)

    def _expired(self, c: _Conn) -> None:
        if c.busy or self._by_protocol.get(c.protocol) is not c:
            return
        self._closed("header_timeout", c.host)
        self._drop(c)
        c.protocol.transport.close()

    # -- called by the application (app.Guard), on the same event loop -------------------------------

    def request_started(self, client) -> None:
        c = self._by_client.get(tuple(client)) if client else None
        if c is not None:
            c.busy += 1
            self._idle.pop(c.protocol, None)
            if c.timer is not None:
                c.timer.cancel()
                c.timer = None

    def request_finished(self, client) -> None:
        c = self._by_client.get(tuple(client)) if client else None
        if c is not None and self._by_protocol.get(c.protocol) is c:
            c.busy = max(0, c.busy - 1)
            if not c.busy:
                self._wait_for_head(c)

    # -- the uvicorn protocol ------------------------------------------------------------------------

    def protocol(self, base=None) -> type:
        """uvicorn's HTTP protocol class (h11, or httptools when installed) under this guard."""
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol as base
        guard = self

        class GuardedProtocol(base):
            def connection_made(self, transport):
                super().connection_made(transport)
                if not guard.opened(self, transport):
                    transport.close()

            def connection_lost(self, exc):
                guard.lost(self)
                super().connection_lost(exc)

        return GuardedProtocol


class RateLimitedLog(logging.Filter):
    """Lets through at most `burst` records, then `per_second`, per (logger, message template), and
    at most `total_per_second` (burst `total_burst`) in all; the next record let through says how
    many were dropped. A flood of the same error can then not fill a disk."""

    def __init__(self, per_second: float = 2.0, burst: int = 10, total_per_second: float = 20.0,
                 total_burst: int = 100, clock=time.monotonic):
        self.clock = clock
        self.per = (float(per_second), float(burst))
        self.total = [float(total_burst), clock(), float(total_per_second), float(total_burst)]
        self._buckets: dict[tuple, list] = {}
        self.dropped = 0

    @staticmethod
    def _take(b: list, now: float) -> bool:
        b[0] = min(b[3], b[0] + (now - b[1]) * b[2])
        b[1] = now
        if b[0] >= 1:
            b[0] -= 1
            return True
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        if key not in self._buckets and len(self._buckets) >= 1024:
            self._buckets.clear()
        b = self._buckets.setdefault(key, [self.per[1], now, self.per[0], self.per[1]])
        if not (self._take(b, now) and self._take(self.total, now)):
            self.dropped += 1
            return False
        if self.dropped:
            record.msg, record.args = f"{record.getMessage()} ({self.dropped} log lines suppressed)", ()
            self.dropped = 0
        return True


LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio", "isthmus.serve")


def limit_logs(filter_: RateLimitedLog | None = None) -> RateLimitedLog:
    """Attach one rate limit to the server's loggers (after uvicorn configured its logging)."""
    filter_ = filter_ or RateLimitedLog()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for f in list(logger.filters):
            if isinstance(f, RateLimitedLog):
                logger.removeFilter(f)
        logger.addFilter(filter_)
    return filter_


def uvicorn_config(app, **kwargs):
    """A uvicorn config that serves `app` (from `app.create_app`) under its connection guard."""
    import uvicorn
    guard = app.state.isthmus.connections
    kwargs.setdefault("timeout_graceful_shutdown", 5)
    # The guard knows a request's connection by its peer address in the ASGI scope: uvicorn's proxy
    # headers would let a client rewrite it (X-Forwarded-For) and hide a busy connection from it.
    kwargs["proxy_headers"] = False
    config = uvicorn.Config(app, http=guard.protocol(), **kwargs)
    limit_logs()
    return config
