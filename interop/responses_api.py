"""The Responses API (`POST /v1/responses`): OpenAI's interface for new integrations, over the same
engine, sampler, grammars and tools as Chat Completions.

A request is translated once into the chat request it means (`chat_request`: `instructions` and the
stored conversation of `previous_response_id` in front of the input items, `text.format` as
`response_format`, flat function tools as chat tools), so the prompt, the sampling limits, the JSON
grammar and the tool-call format are Chat Completions' own, and a parameter either API names in
an error is renamed to the one this request used (`_RENAMED`). What differs is the shape of the
answer: a `response` object whose `output` is a message or function_call items, and a stream of
typed events (`event: response.output_text.delta` ...), each with its `sequence_number`, ending
with `response.completed` (`response.incomplete` when `max_output_tokens` cut it, `response.failed`
on an engine error). With `store` (the default, as at OpenAI) the response and its conversation are
kept per tenant (interop/response_store.py), sealed at rest, for `previous_response_id`,
`GET /v1/responses/{id}` and `DELETE /v1/responses/{id}`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Annotated, Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from isthmus.interop import openai_api as api
from isthmus.interop.openai_api import INT64, MAX_TOOLS, JsonInt, _Strict
from isthmus.interop.tool_formats import ToolFormat, tool_format
from isthmus.runtime.engine import Delta, Failed, Finished

MAX_ITEMS = 2048
MAX_METADATA = 16


# -- request schema --------------------------------------------------------------------------------

class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    # an earlier response's output sent back as input carries these as the server wrote them
    type: Literal["output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


ContentPart = Annotated[InputText | OutputText, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = Field(None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str
    id: str | None = Field(None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str
    id: str | None = Field(None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _message_by_default(item):
    # OpenAI reads an item without a type as a message ({"role": "user", "content": "..."})
    return {**item, "type": "message"} if isinstance(item, dict) and "type" not in item else item


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type"),
                      BeforeValidator(_message_by_default)]


class FormatText(_Strict):
    type: Literal["text"]


class FormatJsonObject(_Strict):
    type: Literal["json_object"]


class FormatJsonSchema(api.JsonSchemaSpec):
    # Chat Completions' json_schema, flattened into the format with its type
    type: Literal["json_schema"]


class TextConfig(_Strict):
    format: Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")] | None = None


class FunctionTool(api.FunctionDef):
    # Chat Completions' function, flattened into the tool with its type
    type: Literal["function"]


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class ResponseRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(max_length=MAX_ITEMS)
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=256)
    max_output_tokens: JsonInt | None = Field(None, ge=1, lt=INT64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = Field(None, description="keep the response for previous_response_id and GET (default "
                               "true); kept per tenant, sealed, erased after the retention period")
    stream: bool | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=MAX_METADATA)
    user: str | None = None
    service_tier: str | None = Field(None, description="priority, default or flex (auto: the tenant's default)")


# -- response schema (OpenAPI documentation; the handlers build dicts of this shape) ---------------

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class OutputItem(_Open):
    type: Literal["message", "function_call"]
    id: str
    status: str


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict
    output_tokens: int
    output_tokens_details: dict
    total_tokens: int


class ResponseObject(_Open):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: dict | None
    incomplete_details: dict | None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


CREATE_RESPONSES = {
    200: {"model": ResponseObject, "description": "a response; with `stream: true`, server-sent events "
          "(`event: response.created` ... `event: response.completed`, each `data:` a typed event with its "
          "`sequence_number`)", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **api.error_responses(400, 401, 404, 413, 429, 503),
}


# -- translation into the chat request it means ----------------------------------------------------

# a parameter named in an error by the chat machinery, as this API calls it
_RENAMED = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
            "response_format": "text.format"}


def _renamed(e: api.ApiError) -> api.ApiError:
    """`e` naming this API's parameter. A message's index counts the stored conversation and the
    instructions too, so it is not an index of `input`: the parameter is `input` alone."""
    if e.param:
        head = e.param.partition(".")[0].partition("[")[0]
        if head == "messages":
            e.param, e.message = "input", e.message.replace("messages", "the conversation's messages", 1)
        elif head in _RENAMED:
            e.param = _RENAMED[head] + e.param[len(head):]
    return e


def input_messages(req: ResponseRequest) -> list[api.ChatMessage]:
    """This request's input items as chat messages (consecutive function calls are one assistant turn)."""
    if isinstance(req.input, str):
        return [api.ChatMessage(role="user", content=req.input)]
    out: list[api.ChatMessage] = []
    for item in req.input:
        if item.type == "message":
            text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            out.append(api.ChatMessage(role=item.role, content=text))
        elif item.type == "function_call":
            call = api.ToolCall(id=item.call_id, type="function",
                                function=api.FunctionCall(name=item.name, arguments=item.arguments))
            if out and out[-1].role == "assistant" and out[-1].tool_calls:
                out[-1].tool_calls.append(call)
            else:
                out.append(api.ChatMessage(role="assistant", tool_calls=[call]))
        else:
            out.append(api.ChatMessage(role="tool", tool_call_id=item.call_id, content=item.output))
    return out


def chat_request(req: ResponseRequest, messages: list[api.ChatMessage]) -> api.ChatCompletionRequest:
    """The Chat Completions request this one means, over `messages` (the conversation so far)."""
    if req.instructions:
        first = messages[0] if messages else None
        if first is not None and first.role in ("system", "developer") and isinstance(first.content, str):
            messages = [api.ChatMessage(role="system", content=req.instructions + "\n\n" + first.content)] + messages[1:]
        else:
            messages = [api.ChatMessage(role="system", content=req.instructions)] + messages
    if not messages:
        raise api.bad_request("input must hold at least one item", "input")
    fmt = req.text.format if req.text else None
    if fmt is not None:
        fmt = {"type": fmt.type} if fmt.type != "json_schema" else {
            "type": "json_schema", "json_schema": fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)}
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    try:
        return api.ChatCompletionRequest.model_validate({
            "model": req.model, "messages": messages, "temperature": req.temperature, "top_p": req.top_p,
            "max_completion_tokens": req.max_output_tokens, "response_format": fmt,
            "tools": None if req.tools is None else [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools],
            "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
            "service_tier": req.service_tier})
    except ValidationError as e:        # e.g. a stored conversation with more messages than a request may hold
        first = e.errors()[0]
        raise api.bad_request(f"the conversation cannot be continued: {first.get('msg')}",
                              "previous_response_id" if req.previous_response_id else "input") from None


# -- the handlers ----------------------------------------------------------------------------------

def _ids(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Reply:
    """One response being made: its id, the request's echo, and its output items as they form."""

    def __init__(self, req: ResponseRequest, engine, tier: str, n_prompt: int, tools: ToolFormat | None):
        self.req, self.engine, self.tier, self.n_prompt, self.tools = req, engine, tier, n_prompt, tools
        self.id, self.message_id, self.created = _ids("resp"), _ids("msg"), int(time.time())
        self.output: list[dict] = []

    def body(self, status: str, usage: dict | None = None, error: dict | None = None, reason: str | None = None) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(exclude_none=True, by_alias=True) if req.text and req.text.format \
            else {"type": "text"}
        choice = req.tool_choice
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
                "incomplete_details": {"reason": reason} if reason else None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "model": self.engine.name, "output": self.output,
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id,
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else (choice or "auto"),
                "tools": [{**t.model_dump(), "strict": t.strict is not False} for t in req.tools or []],
                "text": {"format": fmt}, "truncation": "disabled", "store": req.store is not False,
                "metadata": req.metadata or {}, "service_tier": self.tier, "user": req.user, "usage": usage}

    def usage(self, completion: int) -> dict:
        return {"input_tokens": self.n_prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.n_prompt + completion}

    def message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def calls(self, text: str, reason: str) -> list[dict] | None:
        """The reply as function_call items, if tools were offered and it is a call."""
        found = self.tools.parse(text) if self.tools and reason == "stop" else None
        return None if not found else [
            {"type": "function_call", "id": _ids("fc"), "call_id": c["id"], "name": c["function"]["name"],
             "arguments": c["function"]["arguments"], "status": "completed"} for c in found]

    def as_messages(self) -> list[dict]:
        """The output as chat messages, for the stored conversation."""
        calls = [i for i in self.output if i["type"] == "function_call"]
        if calls:
            return [{"role": "assistant", "tool_calls": [
                {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls]}]
        return [{"role": "assistant", "content": "".join(p["text"] for i in self.output for p in i["content"])}]


def _status(reason: str) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if reason == "length" else ("completed", None)


async def create(req: ResponseRequest, request: Request, tenant, state):
    t_arrival = time.perf_counter()
    engine = state.engine_for(req.model, tenant)
    history: list[dict] = []
    if req.previous_response_id is not None:
        stored = state.responses.get(tenant.id, req.previous_response_id)
        if stored is None:          # unknown, expired, deleted, or another tenant's: all the same to the caller
            raise api.bad_request(f"Previous response with id '{req.previous_response_id}' not found.",
                                  "previous_response_id", "previous_response_not_found")
        history = stored[1]
    turn = input_messages(req)
    chat = chat_request(req, [api.ChatMessage.model_validate(m) for m in history] + turn)
    fmt = tool_format(engine.tokenizer)
    try:
        tier = api.service_tier(chat.service_tier, tenant)
        ids = await run_in_threadpool(api.prompt_ids, engine, chat.messages, api.system_note(chat, fmt),
                                      api.offered_tools(chat))
        grammar = await run_in_threadpool(api.grammar, chat, engine)
        params = api.sampling(chat, len(ids), engine.n_ctx, engine.vocab, grammar)
    except api.ApiError as e:
        raise _renamed(e) from None
    ticket, queue, done = api.submit(state, engine, tenant, ids, params, tier=tier)
    run = api._Run(state, engine, ticket, queue, t_arrival, {"model": engine.name, "tenant": tenant.id})
    run.user = state.usage_user(request.headers.get("authorization"), req.user)
    reply = _Reply(req, engine, tier, len(ids), fmt if api.offered_tools(chat) is not None else None)
    conversation = history + [m.model_dump(exclude_none=True) for m in turn]

    def keep(body: dict) -> None:
        if req.store is not False:
            state.responses.put(tenant.id, reply.id, body, conversation + reply.as_messages())

    if req.stream:
        return api.SSEResponse(_stream(run, reply, keep), on_close=done)
    watcher = asyncio.get_running_loop().create_task(api._watch_disconnect(request, ticket, queue))
    try:
        body = await _collect(run, reply)
    except api.ClientGone:
        return Response(status_code=499)
    finally:
        watcher.cancel()
        done()
    keep(body)
    return JSONResponse(body)


async def _collect(run, reply: _Reply) -> dict:
    texts = []
    while True:
        event = await run.queue.get()
        if event is api._GONE:
            raise api.ClientGone
        run._seen(event)
        if isinstance(event, Failed):
            raise api.ApiError(event.status, event.message,
                               "invalid_request_error" if event.status == 400 else "server_error")
        if isinstance(event, Delta):
            texts.append(event.text)
        elif isinstance(event, Finished):
            text = "".join(texts)
            status, reason = _status(event.reason)
            reply.output = reply.calls(text, event.reason) or [reply.message(text, status)]
            run._count(reply.n_prompt + event.completion_tokens)
            return reply.body(status, reply.usage(event.completion_tokens), reason=reason)


async def _stream(run, reply: _Reply, keep):
    seq = itertools.count()

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {api._json({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    mid = reply.message_id
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

    def opened() -> str:
        return (event("response.output_item.added", output_index=0, item={**reply.message("", "in_progress"),
                                                                           "content": []})
                + event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part))

    def closed(text: str, status: str) -> str:
        item = reply.message(text, status)
        return (event("response.output_text.done", **where, text=text, logprobs=[])
                + event("response.content_part.done", **where, part=item["content"][0])
                + event("response.output_item.done", output_index=0, item=item))

    # with tools, the reply waits until its first text shows what it is (as Chat Completions streams)
    held: list[str] | None = [] if reply.tools is not None else None
    texts: list[str] = []
    is_open = False
    try:
        yield event("response.created", response=reply.body("in_progress")) + \
            event("response.in_progress", response=reply.body("in_progress"))
        while True:
            out = []
            for e in await _drain(run.queue):
                run._seen(e)
                if isinstance(e, Failed):
                    body = reply.body("failed", error={"code": "server_error", "message": e.message})
                    yield "".join(out) + event("response.failed", response=body)
                    return
                if isinstance(e, Delta):
                    texts.append(e.text)
                    if held is not None:
                        held.append(e.text)
                        begun = "".join(held).lstrip()
                        if not begun or reply.tools.may_be_call(begun):
                            continue
                        delta, held = "".join(held), None       # text: what waited goes out now
                    else:
                        delta = e.text
                    if not is_open:
                        out.append(opened())
                        is_open = True
                    out.append(event("response.output_text.delta", **where, delta=delta, logprobs=[]))
                elif isinstance(e, Finished):
                    text = "".join(texts)
                    status, reason = _status(e.reason)
                    calls = reply.calls(text, e.reason) if held is not None else None
                    if calls:
                        for k, c in enumerate(calls):           # as OpenAI streams a call: item, arguments, done
                            at = {"item_id": c["id"], "output_index": k}
                            out.append(event("response.output_item.added", output_index=k,
                                             item={**c, "arguments": "", "status": "in_progress"}))
                            out.append(event("response.function_call_arguments.delta", **at, delta=c["arguments"]))
                            out.append(event("response.function_call_arguments.done", **at, name=c["name"],
                                             arguments=c["arguments"]))
                            out.append(event("response.output_item.done", output_index=k, item=c))
                        reply.output = calls
                    else:
                        if not is_open:
                            out.append(opened())
                            if text:
                                out.append(event("response.output_text.delta", **where, delta=text, logprobs=[]))
                        out.append(closed(text, status))
                        reply.output = [reply.message(text, status)]
                    run._count(reply.n_prompt + e.completion_tokens)
                    body = reply.body(status, reply.usage(e.completion_tokens), reason=reason)
                    keep(body)              # before the last event: a client may continue from it at once
                    yield "".join(out) + event("response.completed" if status == "completed" else "response.incomplete",
                                               response=body)
                    return
            if out:
                yield "".join(out)
    except Exception:               # a bug in this generator: the stream has begun, so say it as an event
        import logging
        logging.getLogger("isthmus.serve").exception("responses stream failed")
        yield event("response.failed", response=reply.body(
            "failed", error={"code": "server_error", "message": "internal error while streaming"}))


async def _drain(queue) -> list:
    """The next event and whatever else arrived meanwhile (they go out in one write)."""
    events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


def retrieve(state, tenant, response_id: str) -> dict:
    stored = state.responses.get(tenant.id, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored[0]


def delete(state, tenant, response_id: str) -> dict:
    if not state.responses.delete(tenant.id, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _not_found(response_id: str) -> api.ApiError:
    return api.ApiError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
