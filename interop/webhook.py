"""The messaging-platform adapter: a WhatsApp Cloud API style webhook at /webhooks/whatsapp.

GET  is the subscription handshake: hub.mode=subscribe and hub.verify_token equal to ours ->
     200 with hub.challenge as the body; anything else -> 403.
POST carries message notifications. The raw body must carry `X-Hub-Signature-256: sha256=HEX`,
     the HMAC-SHA256 of the body under the app secret (compared in constant time); a missing or
     wrong signature is 401 and nothing in the body is looked at. Messages are de-duplicated by
     message id (platforms redeliver), routed to a tenant by the receiving phone number id, and
     answered in the background: the reply goes out through a pluggable `OutboundClient` (by
     default HTTP to the Graph API's /{phone_number_id}/messages under a configurable base URL).
     A text body that is an end-to-end envelope (interop/e2e.py) is opened inside the enclave
     with AAD = tenant || conversation || seq (replays and reordering rejected) and the reply is
     sealed back to the sender.

The response is 200 whenever the signature checks, with counts ({"accepted", "duplicates",
"rejected", "ignored"}) so an operator can see what happened; the platform only needs the 200.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from isthmus.errors import InputError
from isthmus.interop import openai_api as api
from isthmus.interop.e2e import E2EError, EnvelopeOpener, is_envelope
from isthmus.interop.scheduler import Delta, Failed, Finished, Overloaded
from isthmus.runtime.sampling import SamplingParams

log = logging.getLogger("isthmus.serve")
PATH = "/webhooks/whatsapp"


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
    max_conversations: int = 10000

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
        try:
            return cls(**doc)
        except TypeError as e:
            raise InputError(f"{where}: {e}") from None


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


class WebhookAck(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    ignored: int


@dataclass
class _Inbound:
    tenant: str
    phone_number_id: str
    sender: str
    message_id: str
    text: str
    reply_ctx: object = None            # set when the text came in an e2e envelope


@dataclass
class WhatsAppAdapter:
    config: WhatsAppConfig
    outbound: OutboundClient | None = None
    enclave: object = None              # an e2e.EnclaveKey; without it envelopes are rejected
    _seen: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _history: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _tasks: set = field(default_factory=set)

    def __post_init__(self):
        if self.outbound is None:
            self.outbound = GraphApiClient(self.config.graph_url, self.config.access_token)
        self.opener = EnvelopeOpener(self.enclave) if self.enclave is not None else None
        self._locks: dict[tuple, asyncio.Lock] = {}

    async def idle(self) -> None:
        """Wait until every accepted message has been answered (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await self.idle()
        await self.outbound.aclose()

    # -- HTTP --------------------------------------------------------------------------------------

    def router(self, state) -> APIRouter:
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
                responses=api.error_responses(400, 401, 413),
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
            ack = {"accepted": 0, "duplicates": 0, "rejected": 0, "ignored": 0}
            for item in self._messages(doc, ack):
                key = (item.phone_number_id, item.message_id)
                if key in self._seen:
                    ack["duplicates"] += 1
                    continue
                self._remember(key)
                if is_envelope(item.text):
                    try:
                        if self.opener is None:
                            raise E2EError("this server has no enclave key for envelopes")
                        item.text, item.reply_ctx = self.opener.open(item.text, item.tenant, item.sender)
                    except E2EError as e:
                        log.warning("webhook envelope rejected: %s", e)
                        ack["rejected"] += 1
                        continue
                ack["accepted"] += 1
                task = asyncio.get_running_loop().create_task(self._answer(state, item))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for outcome, count in ack.items():
                if count:
                    metrics.webhook.inc(count, outcome=outcome)
            return JSONResponse(ack)

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
                    yield _Inbound(tenant, pnid, m["from"], m["id"], m["text"]["body"])

    def _remember(self, key) -> None:
        self._seen[key] = True
        while len(self._seen) > 100_000:
            self._seen.popitem(last=False)

    # -- answering ---------------------------------------------------------------------------------

    async def _answer(self, state, item: _Inbound) -> None:
        conv = (item.tenant, item.sender)           # conversations never cross tenants
        lock = self._locks.setdefault(conv, asyncio.Lock())
        async with lock:                            # one turn at a time per conversation
            try:
                history = self._history.setdefault(conv, [])
                self._history.move_to_end(conv)
                while len(self._history) > self.config.max_conversations:
                    old, _ = self._history.popitem(last=False)
                    self._locks.pop(old, None)
                reply = await self._generate(state, item.tenant, history + [{"role": "user", "content": item.text}])
                history += [{"role": "user", "content": item.text}, {"role": "assistant", "content": reply}]
                del history[:-self.config.history_messages]
                body = EnvelopeOpener.seal_reply(item.reply_ctx, reply) if item.reply_ctx is not None else reply
                await self.outbound.send_text(item.phone_number_id, item.sender, body)
                state.metrics.webhook.inc(outcome="replied")
            except Exception:
                log.exception("webhook reply to message %s failed", item.message_id)
                state.metrics.webhook.inc(outcome="reply_failed")

    async def _generate(self, state, tenant_id: str, messages: list[dict]) -> str:
        cfg = self.config
        model = cfg.model or next(iter(state.engines))
        tenant = state.tenants.get(tenant_id)
        if tenant is None or not tenant.may_use(model):
            raise InputError(f"tenant {tenant_id!r} may not use the model {model!r}")
        engine = state.engines[model]
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        while True:                                   # drop the oldest turns until the prompt fits
            msgs = [api.ChatMessage(role=m["role"], content=m["content"]) for m in system + messages]
            ids = await run_in_threadpool(api.prompt_ids, engine, msgs)
            if len(ids) + 1 < engine.n_ctx or len(messages) <= 1:
                break
            messages = messages[2:] if len(messages) > 2 else messages[-1:]
        if len(ids) + 1 >= engine.n_ctx:
            return "(That message is too long for me to read.)"
        params = SamplingParams(max_tokens=min(cfg.max_tokens, engine.n_ctx - len(ids)), temperature=cfg.temperature)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for attempt in range(6):
            try:
                engine.submit(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
                break
            except Overloaded:
                await asyncio.sleep(0.5 * 2 ** attempt)
        else:
            raise RuntimeError("the engine stayed overloaded")
        state.metrics.prompt_tokens.inc(len(ids), model=model, tenant=tenant_id)
        parts = []
        while True:
            ev = await queue.get()
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Finished):
                state.metrics.completion_tokens.inc(ev.completion_tokens, model=model, tenant=tenant_id)
                return "".join(parts)
            elif isinstance(ev, Failed):
                raise RuntimeError(ev.message)
