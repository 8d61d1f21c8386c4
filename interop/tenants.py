"""Tenants: who may call the server, with which models, how often.

A tenants file (TOML, or JSON with the same structure) lists each tenant's API keys as SHA-256
hashes (the server never stores a key itself), the models it may use, and its limits:

    [[tenants]]
    id = "acme"
    api_key_sha256 = ["5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
    models = ["*"]                  # or a list of served model ids
    requests_per_second = 5.0       # token bucket: refill rate ...
    burst = 10                      # ... and capacity (omit both for no limit)
    tokens_per_minute = 20000       # prompt + completion tokens (x n), reserved at max_tokens, refunded after
    max_sequences = 8               # sequences (n counted) generating or queued at once
    service_tier = "default"        # the tier of its requests that name none (or say "auto")
    service_tiers = ["default", "flex"]   # the tiers it may ask for (its own default is always allowed)

    [admin]                         # optional: the key that may read every series of GET /metrics
    api_key_sha256 = ["..."]

Make a key and its hash with `isthmus serve --new-key`. Without a tenants file the server is
open: every request is the tenant "default", with no key and no limit, and may ask for any tier
(for local use).

Every piece of work a tenant causes (an HTTP completion, a webhook reply) goes through
`Tenant.admit(tokens=..., sequences=..., requests=...)`, which raises `RateLimited` or returns a
`Grant` to `release(used_tokens=...)` when the work is over.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from isthmus.errors import InputError

KEY_PREFIX = "sk-isthmus-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the hash to put in the tenants file."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` answers 0 (granted) or the seconds to wait."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens, self.stamp = float(burst), clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, n: float = 1.0) -> float:
        """The seconds until `n` tokens are there (0: now), without taking them."""
        with self._lock:
            self._refill()
            if self.tokens >= n:
                return 0.0
            return (n - self.tokens) / self.rate if self.rate > 0 else math.inf

    def take(self, n: float = 1.0) -> float:
        with self._lock:
            self._refill()
            if self.tokens >= n:
                self.tokens -= n
                return 0.0
            return (n - self.tokens) / self.rate if self.rate > 0 else math.inf

    def put(self, n: float) -> None:
        """Give back `n` tokens taken and not used (never above the capacity)."""
        with self._lock:
            self._refill()
            self.tokens = min(self.burst, self.tokens + max(0.0, n))


class RateLimited(Exception):
    """A tenant limit refuses the work: `wait` is the seconds until it may pass (None: never, as it is
    larger than the limit itself), `kind` names the limit ("requests", "tokens", "sequences")."""

    def __init__(self, message: str, wait: float | None, kind: str):
        super().__init__(message)
        self.wait, self.kind = wait, kind


class Grant:
    """What `Tenant.admit` granted; `release` once the work is over (idempotent)."""

    def __init__(self, tenant: "Tenant", tokens: int, sequences: int):
        self.tenant, self.tokens, self.sequences, self.released = tenant, tokens, sequences, False

    def release(self, used_tokens: int | None = None) -> None:
        """Free the sequences and refund the reserved tokens not used (`used_tokens`: what the work
        really cost; None: all of it)."""
        t = self.tenant
        with t._lock:
            if self.released:
                return
            self.released = True
            t.sequences -= self.sequences
        if t.token_bucket is not None and used_tokens is not None:
            t.token_bucket.put(self.tokens - used_tokens)


@dataclass(eq=False)
class Tenant:
    id: str
    key_hashes: frozenset[str] = frozenset()
    models: frozenset[str] | None = None          # None: every served model
    bucket: TokenBucket | None = None             # requests
    token_bucket: TokenBucket | None = None       # prompt + completion tokens (per minute)
    max_sequences: int | None = None              # sequences generating or queued at once
    sequences: int = 0                            # ... now
    service_tier: str = "default"                 # the tier of a request that names none
    service_tiers: frozenset[str] | None = None   # the tiers it may ask for; None: all

    def __post_init__(self):
        self._lock = threading.Lock()

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def may_ask(self, tier: str) -> bool:
        return tier == self.service_tier or self.service_tiers is None or tier in self.service_tiers

    def admit(self, *, tokens: int, sequences: int = 1, requests: int = 0) -> Grant:
        """Admit work that may cost up to `tokens` prompt + completion tokens (n counted) and runs
        `sequences` sequences at once, taking `requests` from the request bucket (HTTP requests have
        already taken theirs when authenticated; a webhook message takes 1). All limits pass, or
        none is charged and `RateLimited` says which refused and how long to wait."""
        with self._lock:
            if self.max_sequences is not None and self.sequences + sequences > self.max_sequences:
                if sequences > self.max_sequences:
                    raise RateLimited(f"Tenant `{self.id}` may run {self.max_sequences} sequences at once; "
                                      f"this request asks for {sequences}.", None, "sequences")
                raise RateLimited(f"Tenant `{self.id}` already runs {self.sequences} of its {self.max_sequences} "
                                  "sequences; retry when one has finished.", 1.0, "sequences")
            tb = self.token_bucket
            if tb is not None:
                if tokens > tb.burst:
                    raise RateLimited(f"Request too large for tenant `{self.id}`: it may use up to {tokens} "
                                      f"tokens, over the limit of {int(tb.burst)} tokens per minute; lower "
                                      "max_tokens, n or the prompt.", None, "tokens")
                wait = tb.wait(tokens)
                if wait > 0:
                    raise RateLimited(f"Token rate limit reached for tenant `{self.id}` ({int(tb.burst)} per "
                                      f"minute): retry in {wait:.2f} s.", wait, "tokens")
            if requests and self.bucket is not None:
                wait = self.bucket.take(requests)
                if wait > 0:
                    raise RateLimited(f"Rate limit reached for tenant `{self.id}`: retry in {wait:.2f} s.",
                                      wait, "requests")
            if tb is not None and tb.take(tokens) > 0:
                # a bucket shared by replicas (interop/shared_state.py) lost its tokens to another
                # replica between the check and the take: refused, and the request token given back
                if requests and self.bucket is not None:
                    self.bucket.put(requests)
                raise RateLimited(f"Token rate limit reached for tenant `{self.id}` ({int(tb.burst)} per "
                                  "minute): retry in 1.00 s.", 1.0, "tokens")
            self.sequences += sequences
            return Grant(self, tokens if tb is not None else 0, sequences)


class AuthError(Exception):
    """Missing or unknown API key (401)."""


@dataclass
class Tenants:
    tenants: list[Tenant] = field(default_factory=list)

    admin_hashes: frozenset[str] = frozenset()

    def __post_init__(self):
        self._by_hash = {h: t for t in self.tenants for h in t.key_hashes}
        self.open = not self.tenants
        self._anonymous = Tenant("default")

    def is_admin(self, authorization: str | None) -> bool:
        """Whether an `Authorization: Bearer KEY` header carries an admin key."""
        scheme, _, key = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and bool(key.strip()) and hash_key(key.strip()) in self.admin_hashes

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose key is in an `Authorization: Bearer KEY` header."""
        if self.open:
            return self._anonymous
        if not authorization:
            raise AuthError("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError("The Authorization header must be 'Bearer YOUR_KEY'.")
        # Looked up by the key's SHA-256: a timing difference could only reveal a prefix of a hash
        # of the presented key, which tells an attacker nothing about any stored key.
        tenant = self._by_hash.get(hash_key(key))
        if tenant is None:
            shown = key[:6] + "..." + key[-2:] if len(key) > 12 else "***"
            raise AuthError(f"Incorrect API key provided: {shown}.")
        return tenant

    def get(self, tenant_id: str) -> Tenant | None:
        if self.open:
            return self._anonymous
        return next((t for t in self.tenants if t.id == tenant_id), None)

    @classmethod
    def from_config(cls, doc: dict, where: str = "tenants") -> Tenants:
        """Tenants from a parsed tenants file; any mistake is one `InputError` naming the entry."""
        unknown = set(doc) - {"tenants", "admin", "whatsapp", "responses"}
        if unknown:
            raise InputError(f"{where}: unknown table(s) {sorted(unknown)}; known: admin, responses, tenants, whatsapp")
        items = doc.get("tenants", [])
        if not isinstance(items, list):
            raise InputError(f"{where}: 'tenants' must be a list of tables")
        seen, owner, out = set(), {}, []
        for i, item in enumerate(items):
            at = f"{where}: tenants[{i}]"
            if not isinstance(item, dict):
                raise InputError(f"{at} must be a table")
            unknown = set(item) - TENANT_FIELDS
            if unknown:
                raise InputError(f"{at} has unknown field(s) {sorted(unknown)}; known: {sorted(TENANT_FIELDS)}")
            tid = item.get("id")
            if not isinstance(tid, str) or not tid or tid in seen:
                raise InputError(f"{at}: 'id' must be a unique non-empty string")
            seen.add(tid)
            hashes = _hashes(item.get("api_key_sha256", []), at)
            for h in hashes:
                if h in owner:
                    raise InputError(f"{at}: the API key hash {h[:12]}... is also a key of {owner[h]}; "
                                     "each key must belong to one tenant")
                owner[h] = f"tenant {tid!r}"
            models = item.get("models", ["*"])
            if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
                raise InputError(f"{at}: 'models' must be a list of model ids (or [\"*\"])")
            rate, burst = item.get("requests_per_second"), item.get("burst")
            bucket = None
            if rate is not None or burst is not None:
                rate = _number(rate, f"{at}: 'requests_per_second'")
                burst = max(1, math.ceil(rate)) if burst is None else _count(burst, f"{at}: 'burst'")
                bucket = TokenBucket(rate, burst)
            tokens = None
            if "tokens_per_minute" in item:
                tpm = _count(item["tokens_per_minute"], f"{at}: 'tokens_per_minute'")
                tokens = TokenBucket(tpm / 60.0, tpm)
            max_seq = _count(item["max_sequences"], f"{at}: 'max_sequences'") if "max_sequences" in item else None
            tier = item.get("service_tier", "default")
            if tier not in TIERS:
                raise InputError(f"{at}: 'service_tier' must be one of {', '.join(TIERS)}, got {tier!r}")
            tiers = item.get("service_tiers", list(DEFAULT_TIERS))
            if not isinstance(tiers, list) or not all(t in TIERS for t in tiers):
                raise InputError(f"{at}: 'service_tiers' must be a list of tiers from {', '.join(TIERS)}")
            out.append(Tenant(tid, frozenset(hashes), None if "*" in models else frozenset(models), bucket, tokens,
                              max_seq, service_tier=tier, service_tiers=frozenset(tiers) | {tier}))
        admin = doc.get("admin", {})
        if not isinstance(admin, dict) or set(admin) - {"api_key_sha256"}:
            raise InputError(f"{where}: 'admin' must be a table with only 'api_key_sha256'")
        admin_hashes = _hashes(admin.get("api_key_sha256", []), f"{where}: admin")
        for h in admin_hashes:
            if h in owner:
                raise InputError(f"{where}: admin: the API key hash {h[:12]}... is also a key of {owner[h]}; "
                                 "the admin key must be a key of its own")
        return cls(out, frozenset(admin_hashes))


TENANT_FIELDS = {"id", "api_key_sha256", "models", "requests_per_second", "burst", "tokens_per_minute",
                 "max_sequences", "service_tier", "service_tiers"}
TIERS = ("priority", "default", "flex")        # runtime.engine.TIERS, best first
DEFAULT_TIERS = ("default", "flex")            # what a tenant may ask for unless its entry says otherwise


def _hashes(value, at: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
            isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h.lower()) for h in value):
        raise InputError(f"{at}: 'api_key_sha256' must be a list of 64-digit hex SHA-256 hashes "
                         "(make one with `isthmus serve --new-key`)")
    out = [h.lower() for h in value]
    if len(set(out)) != len(out):
        raise InputError(f"{at}: 'api_key_sha256' lists the same hash twice")
    return out


def _number(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
        raise InputError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**53:
        raise InputError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def load_config(path) -> dict:
    """The serving config file (TOML or JSON): [[tenants]] and an optional [whatsapp] table."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read the tenants file: {e.strerror}") from None
    try:
        if p.suffix == ".json":
            doc = json.loads(text)
        else:
            import tomllib
            doc = tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: the top level must be a table")
    return doc
