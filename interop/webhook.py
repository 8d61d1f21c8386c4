"""The messaging-platform adapter: a WhatsApp Cloud API style webhook at /webhooks/whatsapp.

GET  is the subscription handshake: hub.mode=subscribe and hub.verify_token equal to ours ->
     200 with hub.challenge as the body; anything else -> 403. The token never reaches the access
     log (`RedactSecrets`).
POST carries message notifications. The raw body must carry `X-Hub-Signature-256: sha256=HEX`,
     the HMAC-SHA256 of the body under the app secret (compared in constant time); a missing or
     wrong signature is 401 and nothing in the body is looked at. Each text message is then, in one
     SQLite transaction (interop/outbox.py), de-duplicated by message id within a time window,
     refused if its timestamp is outside that window, routed to a tenant by the receiving phone
     number id, opened if it is an end-to-end envelope (interop/envelope.py: the sender is authenticated
     and pinned, seq must increase), and written to the durable outbox; only then is it
     acknowledged. A tenant whose outbox backlog is full gets its further messages deferred: they
     are not acknowledged (503, the platform redelivers).

A worker answers the outbox: each conversation's messages in order, each turn admitted by the
tenant's limits (`Tenant.admit`: requests, tokens, sequences), the history kept in the enclave's
conversation store (runtime/tee/conversations.py, sealed between turns, erased after the tenant's
retention period), the reply split into parts of at most `max_chars` characters (sealed to the
sender when the message was an envelope: a conversation that began encrypted never takes or sends
plaintext), and sent with retries and exponential backoff until delivered or expired.

The 200 response counts what happened ({"accepted", "duplicates", "rejected", "ignored"}); the
platform only needs the 200. `DELETE /admin/conversations/{tenant}/{user}` (admin key) erases a
user: their conversations, queued messages and E2E pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from isthmus.errors import InputError, SealError
from isthmus.interop import openai_api as api
from isthmus.interop.envelope import E2EError, EnvelopeOpener, ReplyContext, is_envelope, sealed_reply_budget
from isthmus.interop.outbox import WEEK, Entry, Outbox
from isthmus.runtime.engine import Delta, Failed, Finished, Overloaded
from isthmus.runtime.sampling import SamplingParams

log = logging.getLogger("isthmus.serve")
PATH = "/webhooks/whatsapp"
ADMIN_PATH = "/admin/conversations/{tenant}/{user}"
TOO_LONG = "(That message is too long for me to read.)"
OVER_LIMIT = "(This service has reached its usage limit for that message.)"


@dataclass
class WhatsAppConfig:
    verify_token: str
    app_secret: str
    phone_numbers: dict[str, str]              # phone_number_id -> tenant id
    graph_url: str = "https://graph.facebook.com/v21.0"
    access_token: str = ""
    model: str | None = None                   # the served model that answers (default: the first)
    system_prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    history_messages: int = 16                 # per conversation, oldest dropped first
    outbox: str = ":memory:"                   # SQLite file (from a config file: $ISTHMUS_HOME/webhook/outbox.sqlite3)
    dedup_window_s: float = WEEK               # message ids kept, and the oldest notification taken
    clock_skew_s: float = 300.0                # how far in the future a notification may be stamped
    reply_ttl_s: float = 86400.0               # an unsent reply is retried this long, then dropped
    retry_base_s: float = 1.0                  # backoff: base * 2^attempts (jittered), at most retry_max_s
    retry_max_s: float = 300.0
    max_pending_per_tenant: int = 256          # outbox backlog per tenant before messages are deferred (503)
    max_concurrent: int = 4                    # webhook turns generating at once (all tenants)
    max_chars: int = 4096                      # the platform's limit per text message
    retention_days: float | None = 30.0        # conversation histories idle longer are erased
    tenant_retention_days: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, doc: dict, where: str = "whatsapp") -> WhatsAppConfig:
        if not isinstance(doc, dict):
            raise InputError(f"{where} must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = set(doc) - known
        if unknown:
            raise InputError(f"{where} has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        for key in ("verify_token", "app_secret"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise InputError(f"{where}.{key} must be a non-empty string")
        phones = doc.get("phone_numbers", {})
        if not isinstance(phones, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in phones.items()):
            raise InputError(f"{where}.phone_numbers must map phone number ids to tenant ids")
        for key in ("dedup_window_s", "clock_skew_s", "reply_ttl_s", "retry_base_s", "retry_max_s",
                    "max_pending_per_tenant", "max_concurrent", "max_chars", "history_messages", "max_tokens",
                    "retention_days"):
            v = doc.get(key, 1)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise InputError(f"{where}.{key} must be a positive number")
        if doc.get("max_chars", 4096) < 256:
            raise InputError(f"{where}.max_chars must be at least 256")
        if not isinstance(doc.get("outbox", ""), str):
            raise InputError(f"{where}.outbox must be the path of the outbox's SQLite file")
        days = doc.get("tenant_retention_days", {})
        if not isinstance(days, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in days.values()):
            raise InputError(f"{where}.tenant_retention_days must map tenant ids to a positive number of days")
        doc = dict(doc)
        if "outbox" not in doc:
            from isthmus.models import home
            doc["outbox"] = str(home() / "webhook" / "outbox.sqlite3")
        try:
            return cls(**doc)
        except TypeError as e:
            raise InputError(f"{where}: {e}") from None

    def check_tenants(self, tenants) -> None:
        """One-line error for a phone number (or retention entry) naming a tenant the server lacks."""
        if tenants.open:
            return
        ids = {t.id for t in tenants.tenants}
        for pnid, tid in self.phone_numbers.items():
            if tid not in ids:
                raise InputError(f"whatsapp.phone_numbers maps {pnid} to the unknown tenant {tid!r}; "
                                 f"tenants: {', '.join(sorted(ids))}")
        for tid in self.tenant_retention_days:
            if tid not in ids:
                raise InputError(f"whatsapp.tenant_retention_days names the unknown tenant {tid!r}")

    def retention_s(self, tenant: str) -> float | None:
        days = self.tenant_retention_days.get(tenant, self.retention_days)
        return None if days is None else days * 86400.0


class OutboundClient(Protocol):
    """Where replies go. Tests plug in a client for a fake platform on loopback."""

    async def send_text(self, phone_number_id: str, to: str, body: str) -> None: ...

    async def aclose(self) -> None: ...


class GraphApiClient:
    """POST {base_url}/{phone_number_id}/messages, as the WhatsApp Cloud API takes a text reply."""

    def __init__(self, base_url: str, access_token: str, timeout: float = 15.0):
        import httpx
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout, headers={"Authorization": f"Bearer {access_token}"})

    async def send_text(self, phone_number_id: str, to: str, body: str) -> None:
        r = await self._client.post(f"{self.base_url}/{phone_number_id}/messages", json={
            "messaging_product": "whatsapp", "recipient_type": "individual", "to": to,
            "type": "text", "text": {"preview_url": False, "body": body}})
        r.raise_for_status()

    async def aclose(self) -> None:
        await self._client.aclose()


def signature(app_secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 header value for `body`."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def utf16_len(text: str) -> int:
    """Length as the platform counts it (UTF-16 code units): never less than len(text)."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def split_text(text: str, limit: int, size=utf16_len) -> list[str]:
    """`text` in consecutive parts of at most `limit` by `size`, cut after whitespace where one is
    in the second half of a part, else anywhere. Joined, the parts are `text`."""
    parts, start = [], 0
    while size(text[start:]) > limit:
        end, used, cut = start, 0, None
        while end < len(text) and used + size(text[end]) <= limit:
            used += size(text[end])
            end += 1
            if text[end - 1].isspace() and used > limit // 2:
                cut = end
        parts.append(text[start:cut or end])
        start = cut or end
    parts.append(text[start:])
    return parts


class RedactSecrets(logging.Filter):
    """Strips the webhook's verify token from the query strings in uvicorn's access log."""

    PATTERN = re.compile(r"(hub\.verify_token=)[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "verify_token" in a for a in record.args):
            record.args = tuple(self.PATTERN.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def _install_redaction() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecrets) for f in access.filters):
        access.addFilter(RedactSecrets())


class WebhookAck(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    ignored: int


class Erased(BaseModel):
    tenant: str
    user: str
    conversations: int
    queued_messages: int


@dataclass
class _Inbound:
    tenant: str
    phone_number_id: str
    sender: str
    message_id: str
    text: str
    timestamp: float | None


class _Later(Exception):
    """Not now: retry the entry after `delay` seconds without counting an attempt."""

    def __init__(self, delay: float):
        self.delay = delay


class _Refused(Exception):
    """The entry can never be answered (configuration, or plaintext in an encrypted conversation)."""


def _valid_text(s) -> bool:
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:          # a lone surrogate, as JSON allows: not text we can process
        return False


@dataclass
class WhatsAppAdapter:
    config: WhatsAppConfig
    outbound: OutboundClient | None = None
    enclave: object = None              # an envelope.EnclaveKey; without it envelopes are rejected
    outbox: Outbox | None = None
    conversations: object = None        # a ConversationStore; default: the enclave's, else one of our own
    _tasks: set = field(default_factory=set)

    def __post_init__(self):
        if self.outbound is None:
            self.outbound = GraphApiClient(self.config.graph_url, self.config.access_token)
        if self.outbox is None:
            self.outbox = Outbox(self.config.outbox, window_s=self.config.dedup_window_s)
        self.opener = EnvelopeOpener(self.enclave, pins=self.outbox) if self.enclave is not None else None
        if self.conversations is None:
            self.conversations = getattr(self.enclave, "conversations", None)
        if self.conversations is None:
            # no simulated TEE: a store of our own, under a secret that lives in this process only
            from isthmus.runtime.tee.conversations import ConversationStore
            self.conversations = ConversationStore(None, bytearray(os.urandom(32)))
        self._state = None
        self._worker: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._busy: set[tuple[str, str]] = set()        # conversations with an entry being delivered
        self._last_purge = 0.0
        _install_redaction()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, state=None) -> None:
        """Start the outbox worker (the app's lifespan calls this; the first POST does if it did not):
        entries left by an earlier run are delivered too."""
        if state is not None:
            self._state = state
        if self._worker is None or self._worker.done():
            self.outbox.resume()
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def idle(self, timeout: float = 60.0) -> bool:
        """Wait until the outbox is empty and nothing is being delivered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while (self._tasks or self.outbox.pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not (self._tasks or self.outbox.pending())

    async def aclose(self) -> None:
        """Stop the worker; what is still in the outbox stays there for the next start."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.outbound.aclose()
        self.outbox.close()

    def erase(self, tenant: str, user: str) -> dict:
        """Erase one user of one tenant: conversation histories (resident state, sealed blob and its key),
        queued messages and their E2E pin."""
        n = sum(self.conversations.erase(tenant, cid) for cid in (f"wa:{user}", f"e2e:{user}"))
        queued = self.outbox.erase_user(tenant, user)
        audit = getattr(getattr(self.enclave, "session", None), "audit", None)
        if audit is not None:
            from isthmus.runtime.tee.audit import subject_digest
            audit.record("erasure", tenant=tenant, user=subject_digest(user), conversations=n, queued=queued)
        return {"tenant": tenant, "user": user, "conversations": n, "queued_messages": queued}

    def expire(self, now: float | None = None) -> int:
        """Erase the conversations idle past their tenant's retention, drop expired outbox entries and
        forget message ids older than the window."""
        expired = self.outbox.purge()
        if expired:
            log.warning("webhook: %d unsent replies expired", expired)
            if self._state is not None:
                self._state.metrics.webhook.inc(expired, outcome="expired")
        return len(self.conversations.expire(self.config.retention_s, now))

    # -- HTTP --------------------------------------------------------------------------------------

    def router(self, state) -> APIRouter:
        self._state = state
        self.config.check_tenants(state.tenants)
        r = APIRouter(tags=["webhook"])
        metrics = state.metrics

        @r.get(PATH, summary="Subscription handshake (hub.challenge echo)",
               responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                          **api.error_responses(400, 403)})
        async def verify(mode: str | None = Query(None, alias="hub.mode"),
                         token: str | None = Query(None, alias="hub.verify_token"),
                         challenge: str | None = Query(None, alias="hub.challenge", max_length=1024)):
            ok = mode == "subscribe" and token is not None and hmac.compare_digest(
                token.encode("utf-8", "surrogatepass"), self.config.verify_token.encode())
            if not ok or challenge is None:
                metrics.webhook.inc(outcome="verify_refused")
                raise api.ApiError(403, "The verify token does not match.", "permission_error", code="verify_failed")
            return PlainTextResponse(challenge)

        @r.post(PATH, response_model=WebhookAck, summary="Inbound message notifications (signed)",
                responses=api.error_responses(400, 401, 413, 503),
                openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                    "parameters": [{"name": "X-Hub-Signature-256", "in": "header", "required": True,
                                    "schema": {"type": "string"},
                                    "description": "sha256=HMAC-SHA256(app secret, raw body), hex"}]})
        async def receive(request: Request):
            raw = await request.body()
            given = request.headers.get("x-hub-signature-256")
            if not given or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                    signature(self.config.app_secret, raw).encode()):
                metrics.webhook.inc(outcome="bad_signature")
                raise api.ApiError(401, "Missing or invalid X-Hub-Signature-256.", code="invalid_signature")
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError):
                raise api.bad_request("The body is not JSON.") from None
            self.start(state)
            ack = {"accepted": 0, "duplicates": 0, "rejected": 0, "ignored": 0}
            items = list(self._messages(doc, ack))
            try:
                deferred = self._accept(items, ack)
            except sqlite3.Error as e:         # nothing was acknowledged: the platform redelivers
                log.error("webhook outbox unavailable: %s", e)
                raise api.ApiError(503, "The webhook outbox is unavailable; redeliver later.", "server_error",
                                   code="outbox_unavailable", headers={"Retry-After": "30"}) from None
            for outcome, count in ack.items():
                if count:
                    metrics.webhook.inc(count, outcome=outcome)
            if ack["accepted"]:
                self._wake.set()
            if deferred:
                metrics.webhook.inc(deferred, outcome="deferred")
                raise api.ApiError(503, f"{deferred} message(s) deferred: the tenant's webhook backlog is full "
                                   f"({ack['accepted']} accepted); redeliver later.", "server_error",
                                   code="webhook_backlog", headers={"Retry-After": "30"})
            return JSONResponse(ack)

        @r.delete(ADMIN_PATH, response_model=Erased, tags=["admin"],
                  summary="Erase a user's conversations, queued messages and E2E pin (admin key)",
                  responses=api.error_responses(401))
        async def erase(tenant: str, user: str, request: Request):
            is_admin = getattr(state.tenants, "is_admin", None)
            if is_admin is None or not is_admin(request.headers.get("authorization")):
                raise api.ApiError(401, "This route needs the admin key: 'Authorization: Bearer ADMIN_KEY'.",
                                   code="invalid_api_key")
            return self.erase(tenant, user)

        return r

    def _messages(self, doc, ack: dict):
        """The text messages of a Cloud API notification; anything else (statuses, media) is ignored."""
        if not isinstance(doc, dict) or not isinstance(doc.get("entry"), list):
            raise api.bad_request("Expected a notification object with an 'entry' list.", "entry")
        for entry in doc["entry"]:
            changes = entry.get("changes") if isinstance(entry, dict) else None
            for change in changes if isinstance(changes, list) else []:
                value = change.get("value") if isinstance(change, dict) else None
                if not isinstance(value, dict):
                    continue
                meta = value.get("metadata")
                pnid = meta.get("phone_number_id") if isinstance(meta, dict) else None
                messages = value.get("messages")
                for m in messages if isinstance(messages, list) else []:
                    ok = (isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("from"), str)
                          and m.get("type") == "text" and isinstance(m.get("text"), dict)
                          and isinstance(m["text"].get("body"), str))
                    tenant = self.config.phone_numbers.get(pnid) if isinstance(pnid, str) else None
                    if not ok or tenant is None:
                        ack["ignored"] += 1
                        continue
                    if not all(_valid_text(s) for s in (m["id"], m["from"], m["text"]["body"])) or not m["id"]:
                        log.warning("webhook message rejected: its id, sender or text is not valid UTF-8")
                        ack["rejected"] += 1
                        continue
                    ts = m.get("timestamp")        # the platform sends seconds since the epoch, as a string
                    ts = str(ts) if type(ts) is int else ts
                    ts = float(ts) if isinstance(ts, str) and ts.isascii() and ts.isdigit() and len(ts) < 16 else None
                    yield _Inbound(tenant, pnid, m["from"], m["id"], m["text"]["body"], ts)

    def _accept(self, items: list[_Inbound], ack: dict) -> int:
        """De-duplicate, check, open and queue the messages in one transaction; returns how many were
        deferred (not acknowledged) because their tenant's backlog is full."""
        cfg, now, deferred = self.config, self.outbox.clock(), 0
        backlog: dict[str, int] = {}
        with self.outbox.transaction():
            for item in items:
                if self.outbox.seen(item.phone_number_id, item.message_id):
                    ack["duplicates"] += 1
                    continue
                if item.timestamp is None or not -cfg.clock_skew_s <= now - item.timestamp <= cfg.dedup_window_s:
                    log.warning("webhook message rejected: its timestamp is missing or outside the %d s window",
                                cfg.dedup_window_s)
                    ack["rejected"] += 1
                    continue
                if item.tenant not in backlog:
                    backlog[item.tenant] = self.outbox.pending(item.tenant)
                if backlog[item.tenant] >= cfg.max_pending_per_tenant:
                    deferred += 1
                    continue
                ctx = None
                if is_envelope(item.text):
                    try:
                        if self.opener is None:
                            raise E2EError("this server has no enclave key for envelopes")
                        first = not self.opener.encrypted(item.tenant, item.sender)
                        item.text, reply = self.opener.open(item.text, item.tenant, item.sender)
                        ctx = {"seq": reply.seq, "key": reply.key.hex(), "first": first}
                    except E2EError as e:
                        log.warning("webhook envelope rejected: %s", e)
                        ack["rejected"] += 1
                        continue
                elif self.opener is not None and self.opener.encrypted(item.tenant, item.sender):
                    log.warning("webhook plaintext message rejected: the conversation is end-to-end encrypted")
                    ack["rejected"] += 1
                    continue
                self.outbox.add(item.tenant, item.phone_number_id, item.sender, item.message_id, item.text, ctx,
                                cfg.reply_ttl_s)
                self.outbox.remember(item.phone_number_id, item.message_id)
                backlog[item.tenant] += 1
                ack["accepted"] += 1
        return deferred

    # -- the outbox worker -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if time.time() - self._last_purge > 60:
                    self._last_purge = time.time()
                    self.expire()
                free = self.config.max_concurrent - len(self._tasks)
                for e in self.outbox.due(free, skip=self._busy) if free > 0 else []:
                    self._busy.add((e.tenant, e.sender))
                    task = asyncio.get_running_loop().create_task(self._deliver(e))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                nxt = self.outbox.next_due()
                timeout = 1.0 if nxt is None else min(1.0, max(0.05, nxt - self.outbox.clock()))
            except asyncio.CancelledError:
                raise
            except Exception:              # a database error: keep the worker alive, try again later
                log.exception("webhook outbox worker")
                timeout = 1.0
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, e: Entry) -> None:
        state, metrics = self._state, self._state.metrics
        try:
            if e.reply is None:
                text = await self._turn(state, e)
                self.outbox.set_reply(e, self._bodies(e, text))
            if e.ctx is None and self.opener is not None and self.opener.encrypted(e.tenant, e.sender):
                raise _Refused("the conversation became end-to-end encrypted: no plaintext reply")
            for i in range(e.sent, len(e.reply)):
                await self.outbound.send_text(e.pnid, e.sender, e.reply[i])
                self.outbox.mark_sent(e, i + 1)
            self.outbox.done(e.id)
            metrics.webhook.inc(outcome="replied")
        except asyncio.CancelledError:
            raise
        except _Later as later:
            self.outbox.retry(e, later.delay, count=False)
        except _Refused as why:
            log.warning("webhook reply to a message of tenant %r dropped: %s", e.tenant, why)
            self.outbox.done(e.id)
            metrics.webhook.inc(outcome="refused")
        except Exception as ex:
            if self.outbox.clock() >= e.expires_at:
                log.warning("webhook reply expired after %d attempts (%s)", e.attempts + 1, type(ex).__name__)
                self.outbox.done(e.id)
                metrics.webhook.inc(outcome="expired")
            else:
                delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** min(e.attempts, 30))
                log.warning("webhook reply failed (%s: %s); retry %d in %.1f s", type(ex).__name__,
                            str(ex)[:200], e.attempts + 1, delay)
                self.outbox.retry(e, delay * random.uniform(0.8, 1.2))
                metrics.webhook.inc(outcome="retry")
        finally:
            self._busy.discard((e.tenant, e.sender))
            if self._wake is not None:
                self._wake.set()

    def _bodies(self, e: Entry, text: str) -> list[str]:
        """The reply as the platform takes it: parts of at most `max_chars`, sealed if the message was."""
        limit = self.config.max_chars
        if e.ctx is None:
            return split_text(text, limit)
        ctx = ReplyContext(e.tenant, e.sender, e.ctx["seq"], bytes.fromhex(e.ctx["key"]))
        parts = split_text(text, sealed_reply_budget(limit), size=lambda s: len(s.encode("utf-8")))
        return [EnvelopeOpener.seal_reply(ctx, p, i, len(parts)) for i, p in enumerate(parts)]

    async def _turn(self, state, e: Entry) -> str:
        """One turn of the conversation in the enclave's store: open (restore), generate, record, seal."""
        store = self.conversations
        cid = ("e2e:" if e.ctx is not None else "wa:") + e.sender   # encrypted history never mixes with plain
        if e.ctx is not None and e.ctx.get("first"):
            # a new pin starts a new history: if the host dropped a pin to let another key in, that
            # key must not be answered over the sealed history of the one pinned before
            store.erase(e.tenant, cid)
        try:
            conv = store.open(e.tenant, cid)
        except SealError as why:               # the host lost or altered the sealed history: start afresh
            log.warning("webhook conversation history dropped: %s", why)
            store.erase(e.tenant, cid)
            conv = store.open(e.tenant, cid)
        conv.busy = True
        try:
            user = {"role": "user", "content": e.text}
            reply = await self._generate(state, e.tenant, list(conv.messages) + [user])
            conv.messages = (list(conv.messages) + [user, {"role": "assistant", "content": reply}])[
                -self.config.history_messages:]
            return reply
        finally:
            conv.busy = False
            if (e.tenant, cid) in store:
                store.park(conv)               # sealed at rest: no plaintext history between turns
            else:                              # erased while the turn ran
                conv.messages = []

    async def _generate(self, state, tenant_id: str, messages: list[dict]) -> str:
        from isthmus.interop.tenants import RateLimited
        cfg = self.config
        model = cfg.model or next(iter(state.engines))
        tenant = state.tenants.get(tenant_id)
        if tenant is None or not tenant.may_use(model):
            raise _Refused(f"tenant {tenant_id!r} may not use the model {model!r}")
        engine = state.engines[model]
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        while True:                                   # drop the oldest turns until the prompt fits
            msgs = [api.ChatMessage(role=m["role"], content=m["content"]) for m in system + messages]
            ids = await run_in_threadpool(api.prompt_ids, engine, msgs)
            if len(ids) + 1 < engine.n_ctx or len(messages) <= 1:
                break
            messages = messages[2:] if len(messages) > 2 else messages[-1:]
        if len(ids) + 1 >= engine.n_ctx:
            return TOO_LONG
        params = SamplingParams(max_tokens=min(cfg.max_tokens, engine.n_ctx - len(ids)), temperature=cfg.temperature)
        try:      # webhook work counts against the tenant's limits like an API request
            grant = tenant.admit(tokens=len(ids) + params.max_tokens, sequences=1, requests=1)
        except RateLimited as limited:
            state.metrics.rate_limited.inc(tenant=tenant_id)
            if limited.wait is None:
                return OVER_LIMIT
            raise _Later(limited.wait) from None
        used = 0
        try:
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            try:
                engine.submit(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), tenant=tenant_id,
                              tier=tenant.service_tier)          # messaging users: the tenant's default tier
            except Overloaded:
                raise _Later(1.0) from None
            used = len(ids)
            state.metrics.prompt_tokens.inc(len(ids), model=model, tenant=tenant_id)
            parts = []
            while True:
                ev = await queue.get()
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                elif isinstance(ev, Finished):
                    used += ev.completion_tokens
                    state.metrics.completion_tokens.inc(ev.completion_tokens, model=model, tenant=tenant_id)
                    return "".join(parts)
                elif isinstance(ev, Failed):
                    raise RuntimeError(ev.message)
        finally:
            grant.release(used_tokens=used)


def erase_on_server(server: str, tenant: str, user: str) -> int:
    """`isthmus erase`: DELETE /admin/conversations/{tenant}/{user} on a running server, with the admin
    key from $ISTHMUS_ADMIN_KEY (not a flag: command lines show up in process lists)."""
    from urllib.parse import quote

    import httpx

    key = os.environ.get("ISTHMUS_ADMIN_KEY", "")
    if not key:
        raise InputError("set ISTHMUS_ADMIN_KEY to the server's admin key (the [admin] table of its tenants file)")
    url = f"{server.rstrip('/')}/admin/conversations/{quote(tenant, safe='')}/{quote(user, safe='')}"
    try:
        r = httpx.delete(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach {server}: {e}") from None
    try:
        doc = r.json()
    except ValueError:
        doc = {}
    if r.status_code != 200:
        msg = doc.get("error", {}).get("message") if isinstance(doc.get("error"), dict) else None
        raise InputError(f"{server} refused the erasure ({r.status_code}): {msg or r.text[:200]}")
    print(f"erased tenant {tenant!r} user {user!r}: {doc.get('conversations', 0)} conversation(s), "
          f"{doc.get('queued_messages', 0)} queued message(s)")
    return 0
