"""The FastAPI application: routes, authentication, limits, errors, metrics.

    app = create_app({"smollm2": Engine(exe, name="smollm2")}, tenants=Tenants.from_config(doc))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every response that is not a success is `{"error": {"message", "type", "param", "code"}}`: 400
invalid request (validation included: FastAPI's 422 becomes 400, as OpenAI answers), 401 key, 404
unknown model (or one the tenant may not use: the two are not told apart) or URL, 408 body not
received in time, 413 body too large, 429 rate limited (Retry-After), 503 overloaded (Retry-After)
or no attestation. No input yields a 500; one would be a bug. Connection limits and the header
timeout live in interop/connections.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from isthmus import __version__
from isthmus.errors import IsthmusError
from isthmus.interop import openai_api as api
from isthmus.interop import responses_api
from isthmus.interop.connections import ConnectionGuard
from isthmus.interop.metrics import Metrics
from isthmus.interop.response_store import ResponseStore
from isthmus.interop.tenants import AuthError, RateLimited, Tenant, Tenants

log = logging.getLogger("isthmus.serve")


@dataclass
class Limits:
    """What one client may hold of the server (docs/security.md, "Denial of service")."""
    max_body_bytes: int = 1 << 20
    max_connections: int = 1000         # open connections in all (then the longest-idle one is evicted)
    max_connections_per_client: int = 100   # per client address (0: no limit; behind a proxy, raise it)
    header_timeout: float = 10.0        # seconds for a request head to arrive (0: none)
    body_timeout: float = 30.0          # seconds for the whole body once the head is in (0: none), then 408


class ServerState:
    def __init__(self, engines: dict, tenants: Tenants, metrics: Metrics, limits: Limits, attestation=None):
        self.engines, self.tenants, self.metrics, self.limits = engines, tenants, metrics, limits
        self.attestation = attestation          # anything with report(nonce: bytes) -> bytes, or None
        self.usage = None                       # a runtime.privacy.UsageStats, or None: see record_usage
        self.responses = ResponseStore()        # the Responses API's stored responses
        self.created = int(time.time())
        self.connections = ConnectionGuard(limits.max_connections, limits.max_connections_per_client,
                                           limits.header_timeout, metrics)

    # -- the usage hook (differentially private statistics, runtime/privacy.py) ------------------
    @staticmethod
    def usage_user(authorization: str | None, end_user: str | None = None) -> str:
        """Who a request counts for: the end-user id the client sent, else the SHA-256 of its API key."""
        from isthmus.interop.tenants import hash_key
        if end_user:
            return "end-user:" + end_user
        return "api-key:" + hash_key((authorization or "").partition(" ")[2].strip())

    def record_usage(self, tenant_id: str, user: str, tokens: int, messages: int = 1) -> None:
        """Call once per completed request (chat completion, answered webhook message): counts that
        leave only through `isthmus usage export`, with differential privacy. Never raises."""
        if self.usage is None:
            return
        try:
            self.usage.record(tenant_id, user, time.time(), messages, tokens)
        except Exception:
            log.warning("usage statistics: a completed request was not counted", exc_info=True)

    def engine_for(self, model: str, tenant: Tenant):
        engine = self.engines.get(model)
        if engine is None or not tenant.may_use(model):     # a model the tenant may not use is not named
            raise api.ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        return engine

    @staticmethod
    def fingerprint(engine) -> str:
        return f"isthmus-{__version__}-{engine.exe.target}"


_bearer = HTTPBearer(auto_error=False, description="a tenant API key (any value when the server runs without tenants)")


async def authorize(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Tenant:
    """The caller's tenant, after its rate limit; 401 and 429 in OpenAI's shape."""
    state: ServerState = request.app.state.isthmus
    try:
        tenant = state.tenants.authenticate(request.headers.get("authorization"))
    except AuthError as e:
        raise api.ApiError(401, str(e), code="invalid_api_key") from None
    try:
        tenant.admit(tokens=0, sequences=0, requests=1)
    except RateLimited as e:
        state.metrics.rate_limited.inc(tenant=tenant.id)
        raise api.rate_limited(e) from None
    return tenant


class AttestationReport(BaseModel):
    body: dict
    signature: str
    certificates: list[str]


class Health(BaseModel):
    status: str


def create_app(engines, *, tenants: Tenants | None = None, limits: Limits | None = None, metrics: Metrics | None = None,
               attestation=None, whatsapp=None, usage=None, responses: ResponseStore | None = None) -> FastAPI:
    """`engines`: {model id: Engine} (or one Engine, served under its name). `attestation`: an object
    with `report(nonce) -> bytes` (the simulated TEE's EnclaveSession). `whatsapp`: a
    `webhook.WhatsAppAdapter` to mount at /webhooks/whatsapp. `usage`: a `runtime.privacy.UsageStats`
    that counts completed requests (`ServerState.record_usage`). `responses`: where the Responses
    API keeps stored responses (default: a `ResponseStore` with the default retention)."""
    if not isinstance(engines, dict):
        engines = {engines.name: engines}
    metrics = metrics or Metrics()
    state = ServerState(engines, tenants or Tenants(), metrics, limits or Limits(), attestation)
    state.usage = usage
    if responses is not None:
        state.responses = responses
    for e in engines.values():
        e.metrics = metrics
    metrics.gauge("isthmus_running_sequences", "sequences in the decode batch",
                  lambda: {(("model", k),): e.running for k, e in engines.items()})
    metrics.gauge("isthmus_waiting_requests", "requests queued for a batch slot",
                  lambda: {(("model", k),): e.waiting for k, e in engines.items()})
    metrics.gauge("isthmus_open_connections", "HTTP connections open (under the connection guard)",
                  lambda: state.connections.open)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for e in engines.values():
            e.start()
        if whatsapp is not None:
            whatsapp.start(state)       # the outbox worker: delivers what an earlier run left too
        try:
            yield
        finally:
            for e in engines.values():
                e.stop()
            if whatsapp is not None:
                await whatsapp.aclose()

    app = FastAPI(title="isthmus", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible Chat Completions over models compiled by isthmus. See docs/api.md.")
    app.state.isthmus = state

    @app.exception_handler(api.ApiError)
    async def _api_error(request, exc: api.ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        # of a union's alternatives' errors, the deepest says what is wrong (an image part is an
        # unknown content part, not "input should be a valid string")
        first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
        param = _param(first.get("loc", ()), exc.body)
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, param = "We could not parse the JSON body of your request.", None
        if first.get("type") == "extra_forbidden":        # as OpenAI words an unknown parameter
            return api.bad_request(f"Unrecognized request argument supplied: {param} (this server does not "
                                   "implement it; docs/api.md lists what it does)", param,
                                   "unknown_parameter").response()
        return api.bad_request(f"{msg}" + (f" (at {param})" if param else ""), param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}."
            return api.ApiError(404, msg, code="unknown_url").response()
        return api.ApiError(exc.status_code, str(exc.detail), "invalid_request_error",
                            headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return api.ApiError(500, "The server had an internal error.", "server_error").response()

    @app.post("/v1/chat/completions", response_model=api.ChatCompletion, responses=api.CHAT_RESPONSES,
              summary="Create a chat completion (OpenAI-compatible)", tags=["openai"])
    async def chat_completions(body: api.ChatCompletionRequest, request: Request, tenant: Tenant = Depends(authorize)):
        return await api.chat_completions(body, request, tenant, state)

    @app.post("/v1/responses", response_model=responses_api.ResponseObject,
              responses=responses_api.CREATE_RESPONSES, summary="Create a response (OpenAI's Responses API)",
              tags=["openai"])
    async def create_response(body: responses_api.ResponseRequest, request: Request,
                              tenant: Tenant = Depends(authorize)):
        return await responses_api.create(body, request, tenant, state)

    @app.get("/v1/responses/{response_id}", response_model=responses_api.ResponseObject,
             responses=api.error_responses(401, 404, 429), summary="A stored response (this key's tenant only)",
             tags=["openai"])
    async def get_response(response_id: str, tenant: Tenant = Depends(authorize)):
        return responses_api.retrieve(state, tenant, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=responses_api.DeletedResponse,
                responses=api.error_responses(401, 404, 429), summary="Erase a stored response", tags=["openai"])
    async def delete_response(response_id: str, tenant: Tenant = Depends(authorize)):
        return responses_api.delete(state, tenant, response_id)

    @app.get("/v1/models", response_model=api.ModelList, responses=api.error_responses(401, 429),
             summary="List the models this key may use", tags=["openai"])
    async def list_models(tenant: Tenant = Depends(authorize)):
        return {"object": "list", "data": [api.model_card(m, state.created) for m in engines if tenant.may_use(m)]}

    @app.get("/v1/models/{model}", response_model=api.ModelCard, responses=api.error_responses(401, 403, 404, 429),
             summary="Describe one model", tags=["openai"])
    async def get_model(model: str, tenant: Tenant = Depends(authorize)):
        state.engine_for(model, tenant)
        return api.model_card(model, state.created)

    @app.get("/v1/attestation", response_model=AttestationReport, responses=api.error_responses(400, 503),
             summary="A signed attestation report of the (simulated) enclave, bound to your nonce", tags=["tee"])
    async def attestation(nonce: str = Query(..., pattern=r"^([0-9a-fA-F]{2}){1,64}$",
                                             description="1 to 64 bytes of hex, fresh per request")):
        if state.attestation is None:
            raise api.ApiError(503, "This server runs without the simulated TEE, so it has no attestation report.",
                               "server_error", code="attestation_unavailable", headers={"Retry-After": "3600"})
        # A sealed server's report binds, in its user data, this nonce and the loaded package's identity
        # (tenant, model, version, header digest, Merkle root, owner key), which PCR3 measures.
        try:
            raw = await run_in_threadpool(state.attestation.report, bytes.fromhex(nonce))
        except IsthmusError as e:             # e.g. the audit log cannot be written: no unlogged report
            log.error("attestation refused: %s", e)
            raise api.ApiError(503, "The attestation report cannot be made right now.", "server_error",
                               code="attestation_unavailable", headers={"Retry-After": "60"}) from None
        return Response(raw, media_type="application/json")

    @app.get("/health", response_model=Health, summary="Liveness (says nothing else, and needs no key)", tags=["ops"])
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics: all series with the admin key, a tenant's own with its key",
             tags=["ops"], responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                                      **api.error_responses(401)})
    async def prometheus(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)):
        authorization = request.headers.get("authorization")
        only = None
        if not state.tenants.open and not state.tenants.is_admin(authorization):
            try:
                only = state.tenants.authenticate(authorization).id
            except AuthError as e:
                raise api.ApiError(401, str(e), code="invalid_api_key") from None
        return PlainTextResponse(metrics.render(tenant=only), media_type="text/plain; version=0.0.4")

    if whatsapp is not None:
        app.include_router(whatsapp.router(state))
    app.add_middleware(Guard, state=state)
    return app


_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc, body) -> str | None:
    """A validation error's location as the request's own path (`input.0.content.1`): the parts
    pydantic adds for union alternatives and tags (`str`, `list[...]`, a model's name, `message`)
    are dropped by walking the body alongside."""
    out, here = [], body
    for part in loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc:
        if isinstance(here, dict) and part in here:
            here = here[part]
        elif isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
            here = here[part]
        elif isinstance(part, str) and ("[" in part or "(" in part or part in _LABELS or part[:1].isupper()
                                        or (isinstance(here, dict) and part == here.get("type"))):
            continue
        else:
            here = None                         # a missing field: the rest is below it
        out.append(str(part))
    return ".".join(out) or None


class Guard:
    """Outermost ASGI layer: the body size limit (413), the body timeout (408), per-route request
    metrics, and telling the connection guard when a request starts and ends.

    The body is read here, up to the limit and within `body_timeout`, before the application sees
    it; a larger body (by Content-Length or as it streams in) is refused without being parsed.
    """

    ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/attestation", "/health", "/metrics", "/webhooks/whatsapp",
              "/openapi.json", "/docs")

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    @classmethod
    def route(cls, path: str) -> str:
        """The route label of a path (a bounded set: unknown paths are "other")."""
        if path in cls.ROUTES:
            return path
        if path.startswith("/v1/responses/"):
            return "/v1/responses/{response_id}"
        return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        connections = self.state.connections
        connections.request_started(scope.get("client"))

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            limit = self.state.limits.max_body_bytes
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await self._too_large(send_status, limit)
            chunks, size, more = [], 0, True
            timeout = self.state.limits.body_timeout or None
            deadline = t0 + timeout if timeout else None
            while more:
                try:
                    message = await asyncio.wait_for(receive(), None if deadline is None
                                                     else max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    return await self._timeout(send_status, timeout)
                if message["type"] != "http.request":
                    return                  # the client left before sending its body
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    return await self._too_large(send_status, limit)
            body, replayed = b"".join(chunks), [False]

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            connections.request_finished(scope.get("client"))
            route = self.route(scope.get("path", ""))
            self.state.metrics.requests.inc(route=route, status=str(status[0] or 499))
            self.state.metrics.latency.observe(time.perf_counter() - t0, route=route)

    @staticmethod
    async def _timeout(send, timeout: float):
        resp = api.ApiError(408, f"The request body did not arrive within {timeout:g} s.",
                            code="request_timeout", headers={"Connection": "close"}).response()
        await send({"type": "http.response.start", "status": 408, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    @staticmethod
    async def _too_large(send, limit: int):
        resp = api.ApiError(413, f"The request body is over the limit of {limit} bytes.",
                            code="request_too_large").response()
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})
