"""Usage statistics that leave only as differentially private releases, under a per-tenant budget.

    usage = UsageStats.local()                      # $ISTHMUS_HOME/usage/usage.sqlite3
    usage.record("acme", user="key:3f2a...", when=time.time(), messages=1, tokens=812)   # the serving hook
    doc = usage.export("acme", epsilon=0.5, first=date(2026, 12, 1), last=date(2026, 12, 5))

The unit of privacy is a *user-day*: everything one user (an end-user id, or the SHA-256 of the API
key that made the request) contributed to one tenant on one UTC day. Each export covers days the
caller names (which days hold data is itself never revealed) and releases, per day, four figures
from OpenDP measurements, each given a quarter of the requested epsilon:

    users             count of user-days                    sensitivity 1
    messages          sum of per-user messages, clamped to [0, max_messages]
    tokens            sum of per-user tokens, clamped to [0, max_tokens]
    messages_by_hour  24 counts; a user's messages beyond max_messages are dropped (earliest hours kept),
                      so a user-day changes at most max_messages records (symmetric distance)

with discrete Laplace noise (OpenDP's `make_laplace` on integers, scale found by
`binary_search_chain` so that `map(d_in)` stays within each share). Negative noisy values are
clamped to zero afterwards (post-processing costs no privacy). Days are disjoint sets of user-days,
so one export charges its epsilon to each day it covers (parallel composition), and the four
figures of a day add up by basic sequential composition.

The budget: each tenant has an epsilon budget per day of data (DEFAULT_BUDGET unless set); an export
that would take any of its days over the budget is refused before anything is computed, and the
charge is committed (SQLite) before the noisy figures are drawn, so a crash cannot release without
charging. The ledger outlives the raw counts (deleted after RETENTION_DAYS), and restarts.

Not covered: the raw counts themselves (plain rows in SQLite under $ISTHMUS_HOME, user ids as
keyed SHA-256 digests; whoever reads that folder sees per-user usage: see docs/security.md), users
active on many days (k days cost k times the per-day epsilon), and anything released outside `export`
(metrics, logs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from isthmus.errors import InputError, IsthmusError
from isthmus.runtime.tee.crypto import secret_key_file

DEFAULT_BUDGET = 1.0            # epsilon per tenant per UTC day of data
DEFAULT_MAX_MESSAGES = 20       # per user-day
DEFAULT_MAX_TOKENS = 4000       # per user-day
RETENTION_DAYS = 90             # raw counts older than this are deleted
MAX_EXPORT_DAYS = 366
QUERIES = ("users", "messages", "tokens", "messages_by_hour")
HOURS = 24

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (tenant TEXT, day TEXT, user TEXT, hour INTEGER, messages INTEGER NOT NULL,
                                   tokens INTEGER NOT NULL, PRIMARY KEY (tenant, day, user, hour));
CREATE TABLE IF NOT EXISTS ledger (tenant TEXT, day TEXT, spent REAL NOT NULL, PRIMARY KEY (tenant, day));
CREATE TABLE IF NOT EXISTS budgets (tenant TEXT PRIMARY KEY, epsilon REAL NOT NULL);
CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY, time REAL, tenant TEXT, first TEXT, last TEXT,
                                     epsilon REAL, params TEXT);
"""


class PrivacyError(IsthmusError):
    """A usage export cannot be made: bad parameters, no OpenDP, or unreadable state."""


class BudgetExceededError(PrivacyError):
    """The export would spend more of a tenant's privacy budget than is left."""


def _opendp():
    try:
        import opendp.prelude as dp
    except ImportError:
        raise PrivacyError("usage exports need OpenDP: pip install 'isthmus[privacy]' "
                           "(or pip install opendp)") from None
    dp.enable_features("contrib")
    return dp


def day_of(when: float) -> tuple[str, int]:
    t = dt.datetime.fromtimestamp(when, dt.timezone.utc)
    return t.date().isoformat(), t.hour


class UsageStats:
    """Raw per-user-day counts, the privacy ledger and budgets, in `directory`/usage.sqlite3."""

    def __init__(self, directory, *, default_budget: float = DEFAULT_BUDGET, retention_days: int = RETENTION_DAYS,
                 clock=time.time, audit=None):
        self.dir = Path(directory)
        self.default_budget, self.clock, self.audit = default_budget, clock, audit
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.dir / "usage.sqlite3", isolation_level=None, timeout=30,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            cutoff = (dt.datetime.fromtimestamp(clock(), dt.timezone.utc).date()
                      - dt.timedelta(days=retention_days)).isoformat()
            self._db.execute("DELETE FROM counts WHERE day < ?", (cutoff,))
        except (OSError, sqlite3.Error) as e:
            raise PrivacyError(f"{self.dir}: cannot open the usage statistics ({e})") from None
        os.chmod(self.dir / "usage.sqlite3", 0o600)
        self._user_key = self._key()

    @classmethod
    def local(cls, **kwargs) -> UsageStats:
        """The statistics of this isthmus home ($ISTHMUS_HOME/usage), logging releases to its audit log."""
        from isthmus.models import home
        from isthmus.runtime.tee.audit import AuditLog
        kwargs.setdefault("audit", AuditLog.local())
        return cls(home() / "usage", **kwargs)

    def close(self) -> None:
        self._db.close()

    def _key(self) -> bytes:
        return secret_key_file(self.dir / "user.key", 32, "user id key", PrivacyError)

    def _sql(self, query: str, args=()) -> list:
        try:
            with self._lock:
                return self._db.execute(query, args).fetchall()
        except sqlite3.Error as e:
            raise PrivacyError(f"{self.dir}/usage.sqlite3: {e}") from None

    # -- the serving hook ------------------------------------------------------------------------

    def record(self, tenant: str, user: str, when: float | None = None, messages: int = 1, tokens: int = 0) -> None:
        """Count one completed request: `messages` user messages answered and `tokens` tokens (prompt
        and completion) for `user` of `tenant` at `when` (seconds since the epoch, now by default).
        `user` is stored only as a keyed SHA-256 digest."""
        if not (isinstance(tenant, str) and tenant and isinstance(user, str) and type(messages) is int
                and type(tokens) is int and messages >= 0 and tokens >= 0):
            raise ValueError("record(tenant: str, user: str, when, messages: int >= 0, tokens: int >= 0)")
        day, hour = day_of(self.clock() if when is None else when)
        uid = hmac.new(self._user_key, user.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        self._sql("INSERT INTO counts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, day, user, hour) DO UPDATE "
                  "SET messages = messages + excluded.messages, tokens = tokens + excluded.tokens",
                  (tenant, day, uid, hour, messages, tokens))

    # -- budget ----------------------------------------------------------------------------------

    def budget(self, tenant: str) -> float:
        rows = self._sql("SELECT epsilon FROM budgets WHERE tenant = ?", (tenant,))
        return rows[0][0] if rows else self.default_budget

    def set_budget(self, tenant: str, epsilon: float) -> None:
        _check_epsilon(epsilon, "the budget")
        self._sql("INSERT OR REPLACE INTO budgets VALUES (?, ?)", (tenant, float(epsilon)))
        if self.audit is not None:
            self.audit.record("privacy-budget", tenant=tenant, epsilon_per_day=float(epsilon))

    def spent(self, tenant: str) -> dict[str, float]:
        """Epsilon spent per day of data (only days some export covered)."""
        return dict(self._sql("SELECT day, spent FROM ledger WHERE tenant = ? ORDER BY day", (tenant,)))

    # -- releases --------------------------------------------------------------------------------

    def export(self, tenant: str, epsilon: float, first: dt.date, last: dt.date, *,
               max_messages: int = DEFAULT_MAX_MESSAGES, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
        """A differentially private release of `tenant`'s usage on each day from `first` to `last`
        (see the module docstring). BudgetExceededError, with nothing charged or released, when
        `epsilon` more would exceed the budget on any of those days."""
        _check_epsilon(epsilon, "--epsilon")
        if last < first or (last - first).days >= MAX_EXPORT_DAYS:
            raise PrivacyError(f"the export must cover 1 to {MAX_EXPORT_DAYS} days, from the first to the last")
        for name, value in (("max_messages", max_messages), ("max_tokens", max_tokens)):
            if type(value) is not int or not 1 <= value <= 10**7:
                raise PrivacyError(f"{name} must be an integer from 1 to 10000000")
        days = [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
        queries = _queries(_opendp(), float(epsilon), max_messages, max_tokens)
        self._charge(tenant, days, float(epsilon), {"max_messages": max_messages, "max_tokens": max_tokens})
        out = []
        for day in days:
            rows = self._sql("SELECT user, hour, messages, tokens FROM counts WHERE tenant = ? AND day = ? "
                             "ORDER BY user, hour", (tenant, day))
            out.append({"day": day, **_release(queries, rows, max_messages)})
        spent = self.spent(tenant)
        return {"tenant": tenant, "first": days[0], "last": days[-1], "epsilon": float(epsilon),
                "unit": "one user's contributions to this tenant on one UTC day (a user-day)",
                "bounds": {"messages_per_user_day": max_messages, "tokens_per_user_day": max_tokens},
                "mechanism": "discrete Laplace via OpenDP " + _opendp_version(),
                "queries": {q: {"epsilon": m.map(d), "scale": s} for q, (m, d, s) in queries.items()},
                "budget_per_day": self.budget(tenant), "spent": {d: spent[d] for d in days},
                "days": out}

    def _charge(self, tenant: str, days: list[str], epsilon: float, params: dict) -> None:
        budget = self.budget(tenant)
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for day in days:
                        row = db.execute("SELECT spent FROM ledger WHERE tenant = ? AND day = ?",
                                         (tenant, day)).fetchone()
                        spent = row[0] if row else 0.0
                        if spent + epsilon > budget * (1 + 1e-9):
                            raise BudgetExceededError(
                                f"tenant {tenant!r} has spent epsilon {spent:g} of its budget {budget:g} on {day}; "
                                f"an export at {epsilon:g} more is refused")
                        db.execute("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?)", (tenant, day, spent + epsilon))
                    db.execute("INSERT INTO releases (time, tenant, first, last, epsilon, params) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (self.clock(), tenant, days[0], days[-1], epsilon, json.dumps(params)))
                    if self.audit is not None:     # logged before commit: no release goes unlogged
                        self.audit.record("usage-release", tenant=tenant, first=days[0], last=days[-1],
                                          epsilon=epsilon, **params)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise PrivacyError(f"{self.dir}/usage.sqlite3: {e}") from None


def _check_epsilon(epsilon, what: str) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon <= 100 \
            or not math.isfinite(epsilon):
        raise PrivacyError(f"{what} must be an epsilon above 0 and at most 100, got {epsilon!r}")


def _opendp_version() -> str:
    from importlib.metadata import version
    return version("opendp")


_CACHE: dict = {}


def _queries(dp, epsilon: float, max_messages: int, max_tokens: int) -> dict:
    """{query: (measurement, d_in, noise scale)} with each measurement's map(d_in) <= epsilon / 4."""
    key = (epsilon, max_messages, max_tokens)
    if key in _CACHE:
        return _CACHE[key]
    share = epsilon / len(QUERIES)
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.symmetric_distance()
    def clamped_sum(bound):
        return lambda s: space >> dp.t.then_clamp((0, bound)) >> dp.t.then_sum() >> dp.m.then_laplace(s)

    by_hour = dp.t.then_count_by_categories(categories=list(range(HOURS)), null_category=False)
    chains = {                  # query: (measurement of a noise scale, input distance of one user-day)
        "users": (lambda s: space >> dp.t.then_count() >> dp.m.then_laplace(s), 1),
        "messages": (clamped_sum(max_messages), 1),
        "tokens": (clamped_sum(max_tokens), 1),
        "messages_by_hour": (lambda s: space >> by_hour >> dp.m.then_laplace(s), max_messages),
    }
    out = {}
    if len(_CACHE) > 16:
        _CACHE.clear()
    for name, (chain, d_in) in chains.items():
        scale = dp.binary_search_param(chain, d_in=d_in, d_out=share)
        m = chain(scale)
        if m.map(d_in) > share:
            raise PrivacyError(f"OpenDP could not calibrate {name} within epsilon {share:g}")
        out[name] = (m, d_in, scale)
    _CACHE[key] = out
    return out


def _release(queries: dict, rows: list, max_messages: int) -> dict:
    """The noisy figures of one day from its rows (user, hour, messages, tokens), users in order."""
    per_user: dict[str, list] = {}
    for user, hour, messages, tokens in rows:
        u = per_user.setdefault(user, [0, 0, []])
        u[0] += messages
        u[1] += tokens
        u[2].append((hour, messages))
    hours = []
    for _, _, by_hour in per_user.values():     # each user adds at most max_messages hour labels
        room = max_messages
        for h, m in by_hour:
            hours += [h] * min(m, room)
            room -= min(m, room)
    users = [1] * len(per_user)

    def noisy(name, data):
        value = queries[name][0](data)
        return [max(0, int(v)) for v in value] if isinstance(value, list) else max(0, int(value))

    return {"users": noisy("users", users), "messages": noisy("messages", [u[0] for u in per_user.values()]),
            "tokens": noisy("tokens", [u[1] for u in per_user.values()]),
            "messages_by_hour": noisy("messages_by_hour", hours)}


def parse_day(text: str, flag: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise InputError(f"{flag} must be a date as YYYY-MM-DD, got {text!r}") from None
