"""The Responses API (issue 17) through a live server with the official openai client: text, JSON
schema, function calling, streaming with typed events, and previous_response_id per tenant.

Oracles: the runtime's own unbatched generation loop (`isthmus.chat` on the same executable) for
what a greedy reply must be, over the conversation a continued response must have rebuilt;
`jsonschema` for every structured output and call argument; the client's own stream helpers for
the event protocol. The tiny random model cannot write JSON or calls by itself: every valid one is
the grammar's doing."""

import json

import jsonschema
import openai
import pydantic
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]
KEYS = {"a": "sk-resp-a-0123456789", "b": "sk-resp-b-0123456789"}
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    tags: list[str] = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def server(live, tmp_path_factory):
    """The tiny chat model with a context of 2,048 (room for a tools prompt and a continued
    conversation), two tenants."""
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key
    from isthmus.runtime.engine import Engine
    from tiny_models import write_tiny_chat_gguf

    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("responses") / "tiny-chat.gguf", context_length=2048)
    exe = isthmus.compile(isthmus.load(path), target="numba")
    tenants = Tenants.from_config({"tenants": [{"id": t, "api_key_sha256": [hash_key(k)]} for t, k in KEYS.items()]})
    app = create_app(Engine(exe, name="tiny-chat", max_batch=4), tenants=tenants)
    s = live.start(app)
    s.model_id, s.exe = "tiny-chat", exe
    yield s
    live.stop(s)


@pytest.fixture
def client(server):
    return server.client(KEYS["a"])


def _expected(server, messages, max_tokens):
    import isthmus
    stream = isthmus.chat(server.exe, messages, max_tokens=max_tokens, temperature=0)
    return "".join(stream), stream.stats


def _create(server, client, **kw):
    return client.responses.create(model=server.model_id, **kw)


def test_text_in_and_out_is_what_the_runtime_generates(server, client):
    r = _create(server, client, input="Hello, who are you?", max_output_tokens=12, temperature=0)
    want, stats = _expected(server, HELLO, 12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == server.model_id
    assert r.output_text == want and len(r.output) == 1 and r.output[0].type == "message"
    assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    assert r.status == ("incomplete" if stats.finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == stats.eval_tokens - (stats.finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # message arrays and instructions: the instructions are the system turn
    r = _create(server, client, instructions="Be brief.", input=HELLO, max_output_tokens=10, temperature=0)
    assert r.output_text == _expected(server, [{"role": "system", "content": "Be brief."}] + HELLO, 10)[0]
    assert r.instructions == "Be brief."


def test_previous_response_id_continues_the_conversation(server, client):
    first = _create(server, client, instructions="Only for the first turn.", input="Hello, who are you?",
                    max_output_tokens=8, temperature=0)
    second = _create(server, client, previous_response_id=first.id, input=[{"role": "user", "content": "And?"}],
                     max_output_tokens=8, temperature=0)
    # the stored conversation is the first turn and its reply; the instructions applied to one request only
    history = HELLO + [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And?"}]
    assert second.output_text == _expected(server, history, 8)[0]
    assert second.previous_response_id == first.id
    third = _create(server, client, previous_response_id=second.id, input="Again.", max_output_tokens=4, temperature=0)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Again."}]
    assert third.output_text == _expected(server, history, 4)[0]
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_stored_responses_belong_to_their_tenant(server, client):
    mine = _create(server, client, input="secret plans", max_output_tokens=4)
    other = server.client(KEYS["b"])
    with pytest.raises(openai.BadRequestError) as e:
        _create(server, other, previous_response_id=mine.id, input="tell me", max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    assert client.responses.retrieve(mine.id).id == mine.id      # still there for its owner
    client.responses.delete(mine.id)
    with pytest.raises(openai.BadRequestError):
        _create(server, client, previous_response_id=mine.id, input="more", max_output_tokens=4)
    unstored = _create(server, client, input="forget me", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_stored_responses_are_sealed_at_rest(server, client):
    r = _create(server, client, input="a rather distinctive sentence", max_output_tokens=4)
    sealed = server.state.responses._sealed
    blobs = b"".join(sealed.blobs.values())
    assert sealed.blobs and b"distinctive" not in blobs and r.output_text.encode() not in blobs


def test_streaming_events_reassemble_to_the_response(server, client):
    want = _create(server, client, input="Hello, who are you?", max_output_tokens=16, temperature=0)
    events = list(_create(server, client, input="Hello, who are you?", max_output_tokens=16, temperature=0,
                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if want.status == "incomplete" else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.output_text
    final = events[-1].response
    assert final.output_text == want.output_text and final.status == want.status
    assert final.usage.output_tokens == want.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == want.output_text     # stored too
    # the client's stream helper over the same text: its deltas carry the growing snapshot
    with client.responses.stream(model=server.model_id, input="Hello, who are you?", max_output_tokens=16,
                                 temperature=0) as s:
        deltas = [e for e in s if e.type == "response.output_text.delta"]
    assert deltas and deltas[-1].snapshot == want.output_text


def test_json_schema_parse_and_stream(server, client):
    for seed in range(3):
        r = client.responses.parse(model=server.model_id, input="Describe a person.", text_format=Person,
                                   temperature=1.0, max_output_tokens=400)
        assert r.status == "completed" and isinstance(r.output_parsed, Person)
        jsonschema.validate(json.loads(r.output_text), Person.model_json_schema())
    with client.responses.stream(model=server.model_id, input="Describe a person.", text_format=Person,
                                 max_output_tokens=400) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert isinstance(final.output_parsed, Person) and "".join(deltas) == final.output_text
    obj = _create(server, client, input="Any JSON object.", text={"format": {"type": "json_object"}},
                  max_output_tokens=300, temperature=0)
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_a_function_call_round_trip(server, client):
    first = _create(server, client, input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
                    max_output_tokens=200, temperature=0)
    assert first.status == "completed" and [i.type for i in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    answer = _create(server, client, previous_response_id=first.id, tools=TOOLS, tool_choice="none",
                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
                     max_output_tokens=6, temperature=0)
    assert answer.output[0].type == "message"
    # the continued prompt is the chat API's for the same conversation: the call, then its result
    chat = client.chat.completions.create(model=server.model_id, tools=[
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS],
        tool_choice="none", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}])
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.output_text == chat.choices[0].message.content
    # the same round trip with the whole history sent back as input (no stored state)
    again = _create(server, client, store=False, tools=TOOLS, tool_choice="none", max_output_tokens=6, temperature=0,
                    input=[{"role": "user", "content": "What is the weather in Paris?"},
                           call.model_dump(exclude_none=True),
                           {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert again.output_text == answer.output_text


def test_streamed_function_calls(server, client):
    want = _create(server, client, input="Weather in Rome?", tools=TOOLS, tool_choice="required",
                   max_output_tokens=200, temperature=0).output[0]
    with client.responses.stream(model=server.model_id, input="Weather in Rome?", tools=TOOLS,
                                 tool_choice="required", max_output_tokens=200, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    got = final.output[0]
    assert got.type == "function_call" and (got.name, got.arguments) == (want.name, want.arguments)
    # with tool_choice auto a reply is either a call or text, whole either way
    for seed in range(3):
        r = _create(server, client, input="Weather in Rome?", tools=TOOLS, max_output_tokens=40, temperature=1.0)
        assert all(i.type in ("message", "function_call") for i in r.output)
        for i in r.output:
            if i.type == "function_call":
                jsonschema.validate(json.loads(i.arguments), WEATHER)


@pytest.mark.parametrize("extra, param", [
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_is_not_served_is_a_400_naming_it(server, client, extra, param):
    body = {"model": server.model_id, "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body=body, cast_to=object)
    assert e.value.body["param"].startswith(param), e.value.body


def test_retention_and_the_per_tenant_cap():
    from isthmus.interop.response_store import ResponsesConfig, ResponseStore

    store = ResponseStore(ResponsesConfig(retention_days=1, tenant_retention_days={"long": 10}, max_per_tenant=2))
    for i in range(3):
        store.put("t", f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
    assert store.get("t", "r0") is None and store.get("t", "r1")[1] == [{"role": "user", "content": "1"}]
    store.put("long", "x", {"id": "x"}, [])
    assert store.get("other", "x") is None
    import time
    assert store.sweep(time.time() + 2 * 86400, force=True) == 2          # t's two; "long" keeps 10 days
    assert store.get("t", "r2") is None and store.get("long", "x") is not None and len(store) == 1
