"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges read at scrape time, and cumulative histograms, each with labels. Thread-safe:
the engine's worker thread observes batch sizes while the event loop counts requests.
`render(tenant=T)` gives only the series labelled with tenant T (what a tenant's key may read);
`render()` everything (the admin key, or a server without tenants).
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self, tenant: str | None = None) -> list[str]:
        return self.header() + self.lines(tenant)

    def lines(self, tenant: str | None) -> list[str]:
        raise NotImplementedError


def _keep(key: tuple, tenant: str | None) -> bool:
    return tenant is None or ("tenant", tenant) in key


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help):
        super().__init__(name, help)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self, tenant):
        with self._lock:
            items = sorted((k, v) for k, v in self._values.items() if _keep(k, tenant))
        return [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped, from `fn() -> {labels tuple: value}` or a plain number."""
    kind = "gauge"

    def __init__(self, name, help, fn: Callable[[], dict | float]):
        super().__init__(name, help)
        self.fn = fn

    def lines(self, tenant):
        got = self.fn()
        items = got.items() if isinstance(got, dict) else [((), got)]
        return [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in items if _keep(tuple(k), tenant)]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets=LATENCY_BUCKETS):
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self._series: dict[tuple, list] = {}      # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels) -> int:
        s = self._series.get(tuple(sorted(labels.items())))
        return s[-1] if s else 0

    def lines(self, tenant):
        lines = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items() if _keep(k, tenant))
        for key, s in items:
            labels = dict(key)
            for b, c in zip(self.buckets, s):
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _num(b)})} {c}")
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {s[-1]}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_num(s[-2])}")
            lines.append(f"{self.name}_count{_labels(labels)} {s[-1]}")
        return lines


class Metrics:
    """Everything the server exports at GET /metrics."""

    def __init__(self):
        self.requests = Counter("isthmus_requests_total", "HTTP requests by route and status code")
        self.latency = Histogram("isthmus_request_duration_seconds", "time from request to last byte, by route")
        self.ttft = Histogram("isthmus_time_to_first_token_seconds", "time from request to the first generated token")
        self.prompt_tokens = Counter("isthmus_prompt_tokens_total", "prompt tokens read, by model and tenant")
        self.completion_tokens = Counter("isthmus_completion_tokens_total", "tokens generated, by model and tenant")
        self.rate_limited = Counter("isthmus_rate_limited_total", "requests refused with 429, by tenant")
        self.webhook = Counter("isthmus_webhook_events_total", "messaging webhook events by outcome")
        self.batch_size = Histogram("isthmus_decode_batch_size", "sequences per batched decode step", BATCH_BUCKETS)
        # per service tier (runtime/engine.py observes all but the TTFT, which counts from the request's arrival)
        self.tier_ttft = Histogram("isthmus_tier_time_to_first_token_seconds",
                                   "time from request to the first generated token, by model and service tier")
        self.queue_time = Histogram("isthmus_queue_seconds",
                                    "time from submit to a batch slot (first choice), by model and service tier")
        self.inter_token = Histogram("isthmus_inter_token_latency_seconds",
                                     "time between consecutive tokens of one sequence, by model and service tier",
                                     TOKEN_BUCKETS)
        self.time_per_output_token = Histogram("isthmus_time_per_output_token_seconds",
                                               "per sequence: (last token - first token) / (tokens - 1), by model "
                                               "and service tier", TOKEN_BUCKETS)
        self.tier_batch_size = Histogram("isthmus_decode_batch_size_by_tier",
                                         "sequences of one service tier per batched decode step", BATCH_BUCKETS)
        self.prefix_lookups = Counter("isthmus_prefix_cache_lookups_total",
                                      "prompts looked up in the prefix cache, by model, tenant, tier and outcome (hit, miss)")
        self.prefix_tokens = Counter("isthmus_prefix_cache_reused_tokens_total",
                                     "prompt tokens whose KV came from the prefix cache, by model, tenant and tier")
        self.connections_closed = Counter("isthmus_connections_closed_total",
                                          "connections the server closed to protect itself, by reason")
        self._gauges: list[Gauge] = []
        self.labels: dict[str, str] = {}       # put on every series (a Ray Serve replica: {"replica": its id})

    def gauge(self, name: str, help: str, fn) -> None:
        self._gauges.append(Gauge(name, help, fn))

    def render(self, tenant: str | None = None) -> str:
        """The exposition text; with `tenant`, only the metrics and series labelled with it."""
        parts = [self.requests, self.latency, self.ttft, self.prompt_tokens, self.completion_tokens,
                 self.rate_limited, self.webhook, self.batch_size, self.tier_ttft, self.queue_time, self.inter_token,
                 self.time_per_output_token, self.tier_batch_size, self.prefix_lookups, self.prefix_tokens,
                 self.connections_closed, *self._gauges]
        out = []
        for m in parts:
            lines = m.lines(tenant)
            if lines or tenant is None:
                out += m.header() + [_with(line, self.labels) for line in lines]
        return "\n".join(out) + "\n"


def _with(line: str, labels: dict) -> str:
    """A series line with `labels` added first."""
    if not labels:
        return line
    name, _, rest = line.partition(" ")
    extra = _labels(labels)[1:-1]
    if name.endswith("}"):
        base, _, inner = name[:-1].partition("{")
        return f"{base}{{{extra},{inner}}} {rest}"
    return f"{name}{{{extra}}} {rest}"
