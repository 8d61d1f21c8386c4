"""Tenants: who may call the server, with which models, how often.

A tenants file (TOML, or JSON with the same structure) lists each tenant's API keys as SHA-256
hashes (the server never stores a key itself), the models it may use, and its rate limit:

    [[tenants]]
    id = "acme"
    api_key_sha256 = ["5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
    models = ["*"]                  # or a list of served model ids
    requests_per_second = 5.0       # token bucket: refill rate ...
    burst = 10                      # ... and capacity (omit both for no limit)

Make a key and its hash with `isthmus serve --new-key`. Without a tenants file the server is
open: every request is the tenant "default", with no key and no limit (for local use).
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

    def take(self, n: float = 1.0) -> float:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return 0.0
            return (n - self.tokens) / self.rate if self.rate > 0 else math.inf


@dataclass(eq=False)
class Tenant:
    id: str
    key_hashes: frozenset[str] = frozenset()
    models: frozenset[str] | None = None          # None: every served model
    bucket: TokenBucket | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class AuthError(Exception):
    """Missing or unknown API key (401)."""


@dataclass
class Tenants:
    tenants: list[Tenant] = field(default_factory=list)

    def __post_init__(self):
        self._by_hash = {h: t for t in self.tenants for h in t.key_hashes}
        self.open = not self.tenants
        self._anonymous = Tenant("default")

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
        items = doc.get("tenants", [])
        if not isinstance(items, list):
            raise InputError(f"{where}: 'tenants' must be a list of tables")
        seen, out = set(), []
        for i, item in enumerate(items):
            at = f"{where}: tenants[{i}]"
            if not isinstance(item, dict):
                raise InputError(f"{at} must be a table")
            unknown = set(item) - {"id", "api_key_sha256", "models", "requests_per_second", "burst"}
            if unknown:
                raise InputError(f"{at} has unknown field(s) {sorted(unknown)}")
            tid = item.get("id")
            if not isinstance(tid, str) or not tid or tid in seen:
                raise InputError(f"{at}: 'id' must be a unique non-empty string")
            seen.add(tid)
            hashes = item.get("api_key_sha256", [])
            if isinstance(hashes, str):
                hashes = [hashes]
            if not isinstance(hashes, list) or not all(
                    isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h.lower())
                    for h in hashes):
                raise InputError(f"{at}: 'api_key_sha256' must be a list of 64-digit hex SHA-256 hashes "
                                 "(make one with `isthmus serve --new-key`)")
            models = item.get("models", ["*"])
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise InputError(f"{at}: 'models' must be a list of model ids (or [\"*\"])")
            rate, burst = item.get("requests_per_second"), item.get("burst")
            bucket = None
            if rate is not None or burst is not None:
                if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
                    raise InputError(f"{at}: 'requests_per_second' must be a positive number")
                burst = max(1, math.ceil(rate)) if burst is None else burst
                if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
                    raise InputError(f"{at}: 'burst' must be an integer >= 1")
                bucket = TokenBucket(rate, burst)
            out.append(Tenant(tid, frozenset(h.lower() for h in hashes),
                              None if "*" in models else frozenset(models), bucket))
        return cls(out)


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
