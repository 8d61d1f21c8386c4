"""Stored responses: what `previous_response_id` continues and `GET /v1/responses/{id}` returns.

Each stored response is one entry of a `ConversationStore` (runtime/tee/conversations.py) named by
(tenant, response id), holding the response object and the conversation that led to it (the chat
messages of every earlier turn, its own input and its output; never the `instructions`, which as
at OpenAI apply to one request only). Between requests the entry is sealed (AES-256-GCM under a key
derived for its tenant), so its plaintext exists only while a request that reads it runs, and an id
looked up under another tenant names nothing. The store's secret lives in this process only: a
restart forgets every stored response (the blobs could no longer be opened).

Retention follows the webhook's rules (docs/security.md, "Webhook: durability and retention"): a
response idle for longer than its tenant's `retention_days` is erased, and `DELETE
/v1/responses/{id}` erases one at once (blob deleted, its key zeroised). A tenant keeps at most
`max_per_tenant` responses; past that, its least recently used one is erased, so no tenant can
fill the server's memory or push out another's.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from isthmus.errors import InputError, SealError
from isthmus.runtime.tee.conversations import ConversationStore

EXPIRY_PERIOD_S = 60.0          # how often a request also sweeps out expired responses


@dataclass
class ResponsesConfig:
    """The `[responses]` table of the tenants file."""
    retention_days: float | None = 30.0        # stored responses idle longer are erased
    tenant_retention_days: dict[str, float] = field(default_factory=dict)
    max_per_tenant: int = 10_000               # then the tenant's least recently used is erased

    @classmethod
    def from_config(cls, doc: dict, where: str = "responses") -> ResponsesConfig:
        if not isinstance(doc, dict):
            raise InputError(f"{where} must be a table")
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"{where} has unknown field(s) {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        for key in ("retention_days", "max_per_tenant"):
            v = doc.get(key, 1)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise InputError(f"{where}.{key} must be a positive number")
        if not isinstance(doc.get("max_per_tenant", 1), int):
            raise InputError(f"{where}.max_per_tenant must be a whole number")
        days = doc.get("tenant_retention_days", {})
        if not isinstance(days, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in days.values()):
            raise InputError(f"{where}.tenant_retention_days must map tenant ids to a positive number of days")
        return cls(**doc)

    def check_tenants(self, tenants, where: str = "responses") -> None:
        if tenants.open:
            return
        ids = {t.id for t in tenants.tenants}
        for tid in self.tenant_retention_days:
            if tid not in ids:
                raise InputError(f"{where}.tenant_retention_days names the unknown tenant {tid!r}")

    def retention_s(self, tenant: str) -> float | None:
        days = self.tenant_retention_days.get(tenant, self.retention_days)
        return None if days is None else days * 86400.0


class ResponseStore:
    """Stored responses per tenant. Called from the event loop only (it is not thread-safe); each
    call seals or opens one small blob."""

    def __init__(self, config: ResponsesConfig | None = None):
        self.config = config or ResponsesConfig()
        self._sealed = ConversationStore(None, bytearray(os.urandom(32)))
        self._ids: dict[str, OrderedDict[str, None]] = {}        # tenant -> its ids, least recently used first
        self._swept = 0.0

    @staticmethod
    def _name(response_id: str) -> str:
        return "resp:" + response_id

    def put(self, tenant: str, response_id: str, response: dict, history: list[dict]) -> None:
        self.sweep()
        conv = self._sealed.open(tenant, self._name(response_id))
        conv.messages = [{"response": response, "history": history}]
        self._sealed.park(conv)
        ids = self._ids.setdefault(tenant, OrderedDict())
        ids[response_id] = None
        while len(ids) > self.config.max_per_tenant:
            self.delete(tenant, next(iter(ids)))

    def get(self, tenant: str, response_id: str) -> tuple[dict, list[dict]] | None:
        """The response and its conversation, or None if this tenant has no such response."""
        self.sweep()
        if (tenant, self._name(response_id)) not in self._sealed:
            return None
        try:
            conv = self._sealed.open(tenant, self._name(response_id))
        except SealError:               # its blob is gone or does not authenticate: it is no more
            self.delete(tenant, response_id)
            return None
        record = conv.messages[0]
        self._sealed.park(conv)
        self._ids[tenant].move_to_end(response_id)
        return record["response"], record["history"]

    def delete(self, tenant: str, response_id: str) -> bool:
        self._ids.get(tenant, {}).pop(response_id, None)
        return self._sealed.erase(tenant, self._name(response_id))

    def sweep(self, now: float | None = None, force: bool = False) -> int:
        """Erase the responses idle past their tenant's retention (at most once a minute unless
        `force`); how many were erased."""
        now = time.time() if now is None else now
        if not force and now - self._swept < EXPIRY_PERIOD_S:
            return 0
        self._swept = now
        gone = self._sealed.expire(self.config.retention_s, now)
        for tenant, name in gone:
            self._ids.get(tenant, {}).pop(name.removeprefix("resp:"), None)
        return len(gone)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._ids.values())
