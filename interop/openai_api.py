"""The Chat Completions API: request and response schemas, and the handlers behind them.

Shapes follow OpenAI's API reference, because the official `openai` client is the contract:
a completion, the SSE chunks of a stream (`data: {...}` lines ending in `data: [DONE]`, a usage
chunk with `choices: []` only when `stream_options.include_usage` asks for it) and errors as
`{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Annotated, Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from isthmus.errors import IsthmusError
from isthmus.interop.tenants import RateLimited
from isthmus.interop.tool_formats import ToolFormat, tool_format
from isthmus.runtime.engine import TIERS, Delta, Failed, Finished, Overloaded
from isthmus.runtime.sampling import SamplingParams

MAX_N = 8
MAX_STOP = 4
MAX_LOGIT_BIAS = 1024     # entries of logit_bias (token ids)
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
INT64 = 2**63


# -- errors ----------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected while waiting for a non-streamed completion."""


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# -- request schema --------------------------------------------------------------------------------

def _integral(v):
    # JSON Schema's "integer" includes 1.0; strict pydantic would not (nor "1", which stays refused)
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**64 else v


JsonInt = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    # a field this server does not implement is a 400 naming it (as OpenAI answers an unknown
    # parameter), never silently dropped: a client asking for JSON or tools must not get free text
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(max_length=64)
    arguments: str


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class ResponseFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: JsonInt | None = Field(None, ge=1, lt=INT64)
    max_completion_tokens: JsonInt | None = Field(None, ge=1, lt=INT64)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    n: JsonInt | None = Field(None, ge=1, le=MAX_N)
    seed: JsonInt | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: JsonInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema: the "
                                                   "reply is decoded under the schema's grammar (llguidance)")
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS,
                                                description="token id (as a string) -> bias in [-100, 100]")
    top_k: JsonInt | None = Field(None, ge=-1, lt=INT64, description="extension (as in vLLM): keep the k most "
                                  "likely tokens; 0 or -1: no limit")
    min_p: float | None = Field(None, ge=0, le=1, description="extension (as in vLLM): drop tokens less likely "
                                "than min_p times the most likely one")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (as in vLLM): divide "
                                             "the positive logits (multiply the negative ones) of every token "
                                             "in the prompt or the output so far; 1: none")
    user: str | None = None
    service_tier: str | None = Field(None, description="priority, default or flex (auto: the tenant's "
                                     "default); the response says which tier served it")
    ignore_eos: bool | None = Field(None, description="extension (as in vLLM): keep generating past the "
                                    "end-of-turn token, up to max_tokens; for benchmarks")


# -- response schema -------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CalledFunction(BaseModel):
    name: str
    arguments: str                  # a JSON object, as a string (OpenAI's shape)


class CalledTool(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[CalledTool] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    service_tier: Literal["priority", "default", "flex"]
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def error_responses(*statuses: int) -> dict:
    """OpenAPI documentation of the error statuses an operation can answer."""
    what = {400: "invalid request", 401: "missing or invalid API key", 403: "model not allowed for the tenant",
            404: "unknown model", 413: "request body over the limit", 429: "rate limited",
            500: "internal error", 503: "overloaded or unavailable"}
    out = {}
    for s in statuses:
        out[s] = {"model": ErrorResponse, "description": what[s]}
        if s in (429, 503):
            out[s]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                 "schema": {"type": "string"}}}
    return out


CHAT_RESPONSES = {
    200: {"model": ChatCompletion, "description": "a completion; with `stream: true`, server-sent events: "
          "`data: {chat.completion.chunk}` lines, then `data: [DONE]` (an error after the stream began is an "
          "`event: error` line with an error object, then `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 403, 404, 413, 429, 503),
}


# -- the handler -----------------------------------------------------------------------------------

def _text_of(m: ChatMessage, i: int) -> str:
    if m.content is None:
        if m.role != "assistant":
            raise bad_request(f"messages[{i}].content is required for role {m.role!r}", f"messages[{i}].content")
        return ""
    text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:           # JSON can carry lone surrogates ("\ud800"); text cannot
        raise bad_request(f"messages[{i}].content is not valid Unicode (a lone surrogate)",
                          f"messages[{i}].content") from None
    return text


def _turns(messages: list[ChatMessage], fmt: ToolFormat) -> list[dict]:
    """The messages as the chat template takes them; earlier tool calls and their results in the
    tool format of this model (interop/tool_formats.py)."""
    names, out = {}, []
    for i, m in enumerate(messages):
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_request(f"messages[{i}].tool_call_id is required for role 'tool'",
                                  f"messages[{i}].tool_call_id")
            out.append(fmt.result_turn(m.tool_call_id, names.get(m.tool_call_id), _text_of(m, i)))
        elif m.tool_calls:
            if m.role != "assistant":
                raise bad_request(f"messages[{i}].tool_calls is only for role 'assistant'", f"messages[{i}].tool_calls")
            names.update((c.id, c.function.name) for c in m.tool_calls)
            out.append(fmt.call_turn(m.tool_calls, _text_of(m, i)))
        else:
            out.append({"role": "system" if m.role == "developer" else m.role, "content": _text_of(m, i)})
    return out


def system_note(req: ChatCompletionRequest, fmt: ToolFormat) -> str | None:
    """What the request adds to the system turn: the offered tools and the call format (when the
    template does not describe them itself), or a JSON schema format's description (OpenAI: "used by
    the model to determine how to respond")."""
    tools, rf = offered_tools(req), req.response_format
    if tools:
        return fmt.system_note(tools)
    if rf is not None and rf.type == "json_schema" and rf.json_schema.description:
        return f"Reply with a JSON value: {rf.json_schema.description}"
    return None


def prompt_ids(engine, messages: list[ChatMessage], note: str | None = None, tools=None) -> list[int]:
    """The model's chat template applied to `messages`, tokenized (runs in a worker thread); `note`
    (`system_note`) is appended to the system turn, or is one; `tools` (offered_tools) go to a
    template that knows tools."""
    fmt = tool_format(engine.tokenizer)
    msgs = _turns(messages, fmt)
    if note:
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + note}
        else:
            msgs.insert(0, {"role": "system", "content": note})
    try:
        text = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                    **(fmt.template_kwargs(tools) if tools else {}))
        return engine.tokenizer.encode(text)
    except IsthmusError as e:
        raise bad_request(str(e), "messages") from None


def service_tier(asked: str | None, tenant) -> str:
    """The tier a request runs at: the one it asks for if its tenant may use it, else a 400 naming
    the field; none (or "auto", as OpenAI) is the tenant's default."""
    if asked is None or asked == "auto":
        return tenant.service_tier
    if asked not in TIERS:
        raise bad_request(f"service_tier must be one of auto, {', '.join(TIERS)}; got {asked!r}", "service_tier",
                          "invalid_value")
    if not tenant.may_ask(asked):
        raise bad_request(f"service_tier {asked!r} is not available to this API key (it may use "
                          f"{', '.join(t for t in TIERS if tenant.may_ask(t))})", "service_tier", "tier_not_allowed")
    return asked


def offered_tools(req: ChatCompletionRequest) -> list[ToolDef] | None:
    """The tools the model may call in this reply (None: none), after tool_choice."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice", "invalid_value")
        return None
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        named = [t for t in req.tools if t.function.name == choice.function.name]
        if not named:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                              "tool_choice", "invalid_value")
        return named
    return req.tools


def grammar(req: ChatCompletionRequest, engine):
    """The grammar this reply is decoded under (None: free text): a tool call's (its arguments under
    each function's schema; with tool_choice auto, the reply's first token decides between a call and
    text), or `response_format`'s; a 400 for a schema it cannot use."""
    from isthmus.runtime.constraints import Grammar

    tools, fmt = offered_tools(req), req.response_format
    if tools and fmt is not None and fmt.type != "text":
        raise bad_request("response_format and tools cannot be combined here: a reply is either a tool call "
                          "or the formatted value", "response_format", "invalid_value")
    if (tools or (fmt is not None and fmt.type != "text")) and req.ignore_eos:
        raise bad_request("ignore_eos cannot be combined with response_format or tools: a structured reply ends "
                          "when its value does", "ignore_eos", "invalid_value")
    if tools:
        calls = tool_format(engine.tokenizer)
        kind, spec = calls.grammar(tools, req.parallel_tool_calls is not False)
        or_text = calls.opener if req.tool_choice in (None, "auto") else None
        try:
            if kind == "lark":
                return Grammar.lark(engine.tokenizer, engine.vocab, spec, or_text=or_text)
            return Grammar.json(engine.tokenizer, engine.vocab, spec, or_text=or_text)
        except IsthmusError as e:
            raise bad_request(f"a tool's parameters: {e}", "tools", "invalid_value") from None
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    if fmt.type == "json_schema" and schema is None:
        schema = {}                         # OpenAI: no schema is any JSON value
    try:
        return Grammar.json(engine.tokenizer, engine.vocab, schema)
    except IsthmusError as e:
        raise bad_request(str(e), "response_format", "invalid_value") from None


def sampling(req: ChatCompletionRequest, n_prompt: int, n_ctx: int, vocab: int, grammar=None) -> SamplingParams:
    if n_prompt >= n_ctx:
        raise bad_request(f"This model's maximum context length is {n_ctx} tokens. However, your messages "
                          f"resulted in {n_prompt} tokens. Please reduce the length of the messages.",
                          "messages", "context_length_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens is None:
        max_tokens = n_ctx - n_prompt
    elif n_prompt + max_tokens > n_ctx:
        raise bad_request(f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                          f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                          f"completion). Please reduce the length of the messages or completion.",
                          param, "context_length_exceeded")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise bad_request(f"logit_bias keys must be token ids below {vocab}, got {key!r}", "logit_bias",
                              "invalid_value")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value} for token {key}", "logit_bias",
                              "invalid_value")
        bias[int(key)] = float(value)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:            # the smallest nucleus is the single most likely token
        temperature, top_p = 0.0, 1.0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    seed = None if req.seed is None else req.seed % 2**64      # the schema allows negative seeds
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(0, req.top_k or 0),
                          min_p=req.min_p or 0.0, seed=seed, stop=stop, logit_bias=bias,
                          presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                          repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                          grammar=grammar)


class SSEResponse(StreamingResponse):
    """A stream that always runs `on_close` when it ends, the client left, or sending failed."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def rate_limited(e: RateLimited) -> ApiError:
    """A tenant limit's refusal as OpenAI answers it: 429, with Retry-After when waiting helps."""
    headers = {"Retry-After": str(max(1, math.ceil(e.wait)))} if e.wait is not None and math.isfinite(e.wait) else {}
    return ApiError(429, str(e), e.kind, code="rate_limit_exceeded", headers=headers)


_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_text = json.encoder.encode_basestring        # a str as a JSON string, not escaping non-ASCII (as _json)


def _sse(obj) -> str:
    return f"data: {_json(obj)}\n\n"


def submit(state, engine, tenant, ids: list[int], params: SamplingParams, *, n: int = 1, top_logprobs=None,
           ignore_eos: bool = False, tier: str = "default"):
    """Admit a request against its tenant's limits and queue it on the engine (both APIs): its
    ticket, the queue its events arrive on (in the running loop), and `done`, to call once when
    the request ends (cancels what still runs and refunds the unused part of the grant)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(event):
        loop.call_soon_threadsafe(queue.put_nowait, event)

    try:                # the most this request can cost, refunded down to what it used when it ends
        grant = tenant.admit(tokens=(len(ids) + params.max_tokens) * n, sequences=n)
    except RateLimited as e:
        state.metrics.rate_limited.inc(tenant=tenant.id)
        raise rate_limited(e) from None
    try:
        ticket = engine.submit(ids, params, sink, n=n, top_logprobs=top_logprobs, ignore_eos=ignore_eos,
                               tenant=tenant.id, tier=tier)
    except Overloaded as e:
        grant.release(used_tokens=0)
        raise ApiError(503, f"The server is overloaded: {e}. Retry shortly.", "server_error",
                       code="overloaded", headers={"Retry-After": "1"}) from None
    except BaseException:
        grant.release(used_tokens=0)
        raise

    def done():
        ticket.cancel()
        grant.release(used_tokens=len(ids) * n + ticket.generated)

    state.metrics.prompt_tokens.inc(len(ids) * n, model=engine.name, tenant=tenant.id)
    return ticket, queue, done


async def chat_completions(req: ChatCompletionRequest, request: Request, tenant, state):
    t_arrival = time.perf_counter()
    engine = state.engine_for(req.model, tenant)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("logprobs must be true when top_logprobs is given", "top_logprobs")
    tier = service_tier(req.service_tier, tenant)
    fmt = tool_format(engine.tokenizer)
    ids = await run_in_threadpool(prompt_ids, engine, req.messages, system_note(req, fmt), offered_tools(req))
    params = sampling(req, len(ids), engine.n_ctx, engine.vocab, await run_in_threadpool(grammar, req, engine))
    n = req.n or 1
    top = (req.top_logprobs or 0) if req.logprobs else None
    ticket, queue, done = submit(state, engine, tenant, ids, params, n=n, top_logprobs=top,
                                 ignore_eos=bool(req.ignore_eos), tier=tier)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name,
            "system_fingerprint": state.fingerprint(engine), "service_tier": tier}
    run = _Run(state, engine, ticket, queue, t_arrival, {"model": engine.name, "tenant": tenant.id})
    run.tools = fmt if offered_tools(req) is not None else None
    run.user = state.usage_user(request.headers.get("authorization"), req.user)     # for the usage statistics
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(run.stream(head, n, len(ids), include_usage, top is not None), on_close=done)
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, ticket, queue))
    try:
        return JSONResponse(await run.collect(head, n, len(ids), top is not None))
    except ClientGone:
        return Response(status_code=499)        # nobody is listening; nginx's "client closed request"
    finally:
        watcher.cancel()
        done()


_GONE = object()


async def _watch_disconnect(request: Request, ticket, queue: asyncio.Queue) -> None:
    """Cancel `ticket` as soon as the client of a non-streamed request disconnects (its sequences
    leave the batch before the next decode step), and wake the collector."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            ticket.cancel()
            queue.put_nowait(_GONE)
            return


class _Run:
    """Turns one ticket's engine events into a completion or a stream of chunks."""

    def __init__(self, state, engine, ticket, queue, t_arrival, labels):
        self.state, self.engine, self.ticket, self.queue = state, engine, ticket, queue
        self.t_arrival, self.labels, self.first = t_arrival, labels, True

    def _seen(self, event) -> None:
        if self.first and isinstance(event, (Delta, Finished)):
            self.first = False
            ttft = time.perf_counter() - self.t_arrival
            self.state.metrics.ttft.observe(ttft, model=self.engine.name)
            self.state.metrics.tier_ttft.observe(ttft, model=self.engine.name, tier=self.ticket.tier)
        if isinstance(event, Finished):
            self.state.metrics.completion_tokens.inc(event.completion_tokens, **self.labels)

    user: str | None = None         # who the request counts for in the usage statistics
    tools: ToolFormat | None = None     # tools were offered: a reply that is a call becomes tool_calls

    def _count(self, tokens: int) -> None:
        """The request completed: one message answered, `tokens` used (ServerState.record_usage)."""
        if self.user is not None:
            self.state.record_usage(self.labels["tenant"], self.user, tokens)

    async def collect(self, head: dict, n: int, n_prompt: int, logprobs: bool) -> dict:
        texts, logs, reasons, completion = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n, 0
        remaining = n
        while remaining:
            event = await self.queue.get()
            if event is _GONE:
                raise ClientGone
            self._seen(event)
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message,
                               "invalid_request_error" if event.status == 400 else "server_error")
            if isinstance(event, Delta):
                texts[event.index].append(event.text)
                logs[event.index].extend(event.logprobs or [])
            elif isinstance(event, Finished):
                reasons[event.index] = event.reason
                completion += event.completion_tokens
                remaining -= 1
        choices = []
        for i in range(n):
            text = "".join(texts[i])
            calls = self.tools.parse(text) if self.tools and reasons[i] == "stop" else None
            message = {"role": "assistant", "content": None if calls else text, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": logs[i], "refusal": None} if logprobs else None,
                            "finish_reason": "tool_calls" if calls else reasons[i]})
        self._count(n_prompt + completion)
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                          "total_tokens": n_prompt + completion}}

    async def stream(self, head: dict, n: int, n_prompt: int, include_usage: bool, logprobs: bool):
        head = {**head, "object": "chat.completion.chunk"}
        if include_usage:
            head["usage"] = None
        # every chunk is this head and one choice: its JSON is encoded once, and per token only the
        # text (and the logprobs, when asked for) are encoded and spliced in
        prefix = "data: " + _json(head)[:-1] + ',"choices":[{"index":'
        no_logs = ',"logprobs":null}]}\n\n'

        def chunk(index, delta: str, finish: str = "null", logs=None) -> str:
            tail = no_logs if not logprobs else \
                ',"logprobs":' + _json({"content": logs, "refusal": None}) + "}]}\n\n"
            return f'{prefix}{index},"delta":{delta},"finish_reason":{finish}{tail}'

        completion, remaining, queue = 0, n, self.queue
        # with tools, a reply waits until its first text shows what it is: one that may begin a
        # call (the format's opener) waits whole; any other streams as text from then on
        held = [[] for _ in range(n)] if self.tools else [None] * n
        try:
            yield "".join(chunk(i, '{"role":"assistant","content":"","refusal":null}') for i in range(n))
            while remaining:
                events = [await queue.get()]
                while not queue.empty():            # whatever else arrived meanwhile goes in the same write
                    events.append(queue.get_nowait())
                out = []
                for event in events:
                    self._seen(event)
                    if isinstance(event, Failed):
                        kind = "invalid_request_error" if event.status == 400 else "server_error"
                        out.append(f"event: error\ndata: {json.dumps(error_body(event.message, kind))}\n\n"
                                   "data: [DONE]\n\n")
                        yield "".join(out)
                        return
                    if isinstance(event, Delta):
                        wait = held[event.index]
                        if wait is not None:
                            wait.append(event)
                            begun = "".join(d.text for d in wait).lstrip()
                            if not begun or self.tools.may_be_call(begun):
                                continue
                            held[event.index] = None        # text: what waited goes out now
                            out.append(chunk(event.index, '{"content":' + _text("".join(d.text for d in wait)) + "}",
                                             logs=[x for d in wait for x in (d.logprobs or [])]))
                            continue
                        out.append(chunk(event.index, '{"content":' + _text(event.text) + "}", logs=event.logprobs or []))
                    elif isinstance(event, Finished):
                        completion += event.completion_tokens
                        remaining -= 1
                        reason = event.reason
                        if held[event.index] is not None:
                            text = "".join(d.text for d in held[event.index])
                            calls = self.tools.parse(text) if reason == "stop" else None
                            if calls:
                                reason = "tool_calls"
                                for k, c in enumerate(calls):     # OpenAI's shape: id and name, then arguments
                                    first = {"index": k, "id": c["id"], "type": "function",
                                             "function": {"name": c["function"]["name"], "arguments": ""}}
                                    out.append(chunk(event.index, _json({"tool_calls": [first]}), logs=[]))
                                    more = {"index": k, "function": {"arguments": c["function"]["arguments"]}}
                                    out.append(chunk(event.index, _json({"tool_calls": [more]}), logs=[]))
                            elif text:
                                logs = [x for d in held[event.index] for x in (d.logprobs or [])]
                                out.append(chunk(event.index, '{"content":' + _text(text) + "}", logs=logs))
                        out.append(chunk(event.index, "{}", '"' + reason + '"'))
                if out:
                    yield "".join(out)
            self._count(n_prompt + completion)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                                                             "total_tokens": n_prompt + completion}})
            yield "data: [DONE]\n\n"
        except Exception:           # a bug in this generator: the stream has begun, so say it as an event
            import logging
            logging.getLogger("isthmus.serve").exception("stream failed")
            yield f"event: error\ndata: {json.dumps(error_body('internal error while streaming', 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "isthmus"}
