"""State that must hold across replicas, behind one small interface.

One `isthmus serve` process keeps its tenants' token buckets (tenants.py), the webhook's
de-duplication window, E2E pins and outbox (outbox.py) in its own memory and SQLite file. With
`--replicas N` (interop/scale.py) each replica is its own process, so these move behind
`SharedState`:

* **rate limits**: token buckets by key (`"<tenant>:requests"`, `"<tenant>:tokens"`): `take`, `wait`, `put`;
* **the webhook outbox**: the `Outbox` methods (de-duplication, E2E pins and sequence numbers, queued
  messages and replies), a lease lock that makes the webhook's accept step one unit across replicas,
  and `due`, which leases each entry to one replica for `lease_s` (a replica that dies mid-delivery
  loses its lease, and another delivers the entry: nothing acknowledged is lost);
* **ownership**: which replica holds a stored response or a webhook conversation (`claim`, `owner`,
  `release`), so the router sends its next turn there (its KV prefix cache and history are there).
  A replica not heard from for `stale_s` owns nothing.

Two implementations of the one interface: `LocalState`, in-process, built from exactly the classes
one server uses (`TokenBucket`, `Outbox`), and `RemoteState`, which forwards every call to a
`LocalState` living elsewhere, in practice a Ray actor (scale.py makes it: `ray.remote(LocalState)`;
an actor runs one call at a time, so each call is atomic across replicas). Nothing here imports Ray.

The adapters give the rest of the server the objects it already uses: `SharedBucket` (a
TokenBucket), `SharedOutbox` (an Outbox) and `OwnedResponseStore` (a ResponseStore that records
its owner).
"""

from __future__ import annotations

import contextlib
import time
import uuid

from isthmus.interop.outbox import WEEK, Outbox
from isthmus.interop.response_store import ResponseStore
from isthmus.interop.tenants import TokenBucket

STALE_S = 15.0          # a replica silent this long owns nothing (the outbox worker speaks every second)
LEASE_S = 120.0         # an entry handed to a replica is not handed to another for this long
LOCK_TTL_S = 10.0       # the accept lock frees itself if its holder died

OUTBOX_CALLS = frozenset({"seen", "remember", "pending", "add", "next_due", "set_reply", "mark_sent", "retry",
                          "done", "erase_user", "purge", "get_pin", "put_pin"})


class LocalState:
    """The in-process implementation, and what the Ray actor hosts."""

    def __init__(self, outbox_path: str = ":memory:", window_s: float = WEEK, stale_s: float = STALE_S,
                 clock=time.time):
        self.clock, self.stale_s = clock, float(stale_s)
        self._outbox_args = (outbox_path, float(window_s))
        self._outbox: Outbox | None = None          # opened on first use: a server without the webhook has none
        self._buckets: dict[str, TokenBucket] = {}
        self._owners: dict[tuple, str] = {}
        self._heard: dict[str, float] = {}
        self._lock: tuple[str, float] | None = None   # (holder, expires at)

    def ping(self) -> bool:
        return True

    # -- rate limits -----------------------------------------------------------------------------

    def _bucket(self, key: str, rate: float, burst: float) -> TokenBucket:
        b = self._buckets.get(key)
        if b is None or (b.rate, b.burst) != (float(rate), float(burst)):
            b = self._buckets[key] = TokenBucket(rate, burst)
        return b

    def take(self, key: str, n: float, rate: float, burst: float) -> float:
        return self._bucket(key, rate, burst).take(n)

    def wait(self, key: str, n: float, rate: float, burst: float) -> float:
        return self._bucket(key, rate, burst).wait(n)

    def put(self, key: str, n: float, rate: float, burst: float) -> None:
        self._bucket(key, rate, burst).put(n)

    # -- ownership -------------------------------------------------------------------------------

    def heartbeat(self, replica: str) -> None:
        self._heard[replica] = self.clock()

    def _live(self, replica: str | None) -> bool:
        return replica is not None and self.clock() - self._heard.get(replica, -1e18) <= self.stale_s

    def claim(self, kind: str, tenant: str, key: str, replica: str) -> None:
        self.heartbeat(replica)
        self._owners[(kind, tenant, key)] = replica

    def owner(self, kind: str, tenant: str, key: str) -> str | None:
        """The live replica that holds it, or None."""
        replica = self._owners.get((kind, tenant, key))
        return replica if self._live(replica) else None

    def release(self, kind: str, tenant: str, key: str) -> None:
        self._owners.pop((kind, tenant, key), None)

    # -- the webhook outbox ----------------------------------------------------------------------

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self._outbox_args[0], window_s=self._outbox_args[1], clock=self.clock)
        return self._outbox

    def outbox_call(self, method: str, *args):
        if method not in OUTBOX_CALLS:
            raise ValueError(f"not an outbox call: {method}")
        return getattr(self.outbox, method)(*args)

    def lock(self, holder: str, ttl_s: float = LOCK_TTL_S) -> bool:
        now = self.clock()
        if self._lock is not None and self._lock[0] != holder and self._lock[1] > now:
            return False
        self._lock = (holder, now + ttl_s)
        return True

    def unlock(self, holder: str) -> None:
        if self._lock is not None and self._lock[0] == holder:
            self._lock = None

    def due(self, limit: int, skip, replica: str, lease_s: float = LEASE_S) -> list:
        """Up to `limit` due entries for `replica`, leased to it: those of conversations it owns, or
        that no live replica owns (which it then owns: their history is built there)."""
        self.heartbeat(replica)
        out = []
        for e in self.outbox.due(limit * 4 + 8, skip=set(skip)):
            holder = self.owner("webhook", e.tenant, e.sender)
            if holder not in (None, replica):
                continue
            self.claim("webhook", e.tenant, e.sender, replica)
            self.outbox.retry(e, lease_s, count=False)     # leased: not due to anyone until it ends
            out.append(e)
            if len(out) == limit:
                break
        return out

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()


class RemoteState:
    """The same interface over `call(method, *args)`, which runs the method on a `LocalState`
    elsewhere (scale.py: a Ray actor) and returns its result."""

    def __init__(self, call):
        self._call = call

    def __getattr__(self, name):
        if name.startswith("_") or name not in _REMOTE_CALLS:
            raise AttributeError(name)
        return lambda *args: self._call(name, *args)


_REMOTE_CALLS = frozenset({"ping", "take", "wait", "put", "heartbeat", "claim", "owner", "release", "outbox_call",
                           "lock", "unlock", "due"})


# -- adapters: the objects the server already uses, over a SharedState ---------------------------

class SharedBucket:
    """A `TokenBucket` whose tokens live in the shared state (what `Tenant.admit` calls)."""

    def __init__(self, state, key: str, rate: float, burst: float):
        self.state, self.key, self.rate, self.burst = state, key, float(rate), float(burst)

    def take(self, n: float = 1.0) -> float:
        return self.state.take(self.key, n, self.rate, self.burst)

    def wait(self, n: float = 1.0) -> float:
        return self.state.wait(self.key, n, self.rate, self.burst)

    def put(self, n: float) -> None:
        self.state.put(self.key, n, self.rate, self.burst)


def share_limits(tenants, state) -> None:
    """Move every tenant's request and token buckets into `state` (the sequence limit stays per
    replica: it bounds what one engine holds)."""
    for t in tenants.tenants:
        if t.bucket is not None:
            t.bucket = SharedBucket(state, f"{t.id}:requests", t.bucket.rate, t.bucket.burst)
        if t.token_bucket is not None:
            t.token_bucket = SharedBucket(state, f"{t.id}:tokens", t.token_bucket.rate, t.token_bucket.burst)


class SharedOutbox:
    """The webhook's `Outbox`, in the shared state. `transaction()` holds the shared accept lock
    (each call is atomic by itself; the lock makes check-then-add one unit across replicas)."""

    def __init__(self, state, replica: str, clock=time.time, lease_s: float = LEASE_S):
        self.state, self.replica, self.clock, self.lease_s = state, replica, clock, lease_s
        self._held = 0

    def __getattr__(self, name):
        if name in OUTBOX_CALLS:
            return lambda *args: self.state.outbox_call(name, *args)
        raise AttributeError(name)

    @contextlib.contextmanager
    def transaction(self, timeout_s: float = LOCK_TTL_S):
        if self._held:                              # nested: the outer one holds the lock
            self._held += 1
            try:
                yield self
            finally:
                self._held -= 1
            return
        holder, deadline = f"{self.replica}:{uuid.uuid4().hex}", time.monotonic() + timeout_s
        while not self.state.lock(holder, LOCK_TTL_S):
            if time.monotonic() > deadline:
                import sqlite3
                raise sqlite3.OperationalError("the shared webhook outbox is locked")   # -> 503, redelivered
            time.sleep(0.002)
        self._held = 1
        try:
            yield self
        finally:
            self._held = 0
            self.state.unlock(holder)

    def due(self, limit: int, skip=frozenset()) -> list:
        return self.state.due(limit, list(skip), self.replica, self.lease_s)

    def resume(self) -> None:
        """Nothing: entries leased to a replica that stopped come due again when the lease ends."""

    def set_reply(self, e, bodies: list[str]) -> None:
        self.state.outbox_call("set_reply", e, bodies)
        e.reply = bodies

    def mark_sent(self, e, sent: int) -> None:
        self.state.outbox_call("mark_sent", e, sent)
        e.sent = sent

    def retry(self, e, delay_s: float, count: bool = True) -> None:
        self.state.outbox_call("retry", e, delay_s, count)
        e.attempts += int(count)

    def close(self) -> None:
        """Nothing: the shared state outlives this replica."""


class OwnedResponseStore(ResponseStore):
    """A replica's stored responses, each recorded as owned by it in the shared state, so the router
    sends `previous_response_id` and `GET/DELETE /v1/responses/{id}` here. The responses themselves
    stay sealed in this replica (as in one server: a replica that dies takes them along)."""

    def __init__(self, state, replica: str, config=None):
        super().__init__(config)
        self.state, self.replica = state, replica

    def put(self, tenant: str, response_id: str, response: dict, history: list[dict]) -> None:
        super().put(tenant, response_id, response, history)
        self.state.claim("response", "", response_id, self.replica)   # by id alone: the router knows no tenant

    def delete(self, tenant: str, response_id: str) -> bool:
        gone = super().delete(tenant, response_id)
        if gone:                                    # another tenant's DELETE of this id must not unroute it
            self.state.release("response", "", response_id)
        return gone
        return gone
