"""One timer and one result row for every comparison `isthmus bench` makes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


def best(fn, budget: float = 0.4, rounds: int = 7) -> float:
    """Seconds per call of `fn`: the best of `rounds` timed rounds after one warm call, each round
    repeating `fn` enough to take ~budget / rounds (the machine may be shared: the minimum is
    the figure least disturbed by other work)."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > budget / rounds or n > 1 << 16:
            break
        n *= 4
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


@dataclass
class Row:
    """isthmus against one peer on one case. `ratio` > 1 means isthmus is better (faster, or more
    throughput); for a modeled figure against its bound it is the fraction of the bound reached."""

    group: str
    case: str
    shape: str
    engine: str                   # what ran on the isthmus side: "numba", "npu", "package.seal"
    value: float | None           # isthmus's figure in `unit`
    peer: str
    peer_value: float | None
    unit: str                     # "us", "tok/s", "MB/s", "cycles"
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.value or not self.peer_value:
            return None
        return self.value / self.peer_value if self.higher_is_better else self.peer_value / self.value

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}

