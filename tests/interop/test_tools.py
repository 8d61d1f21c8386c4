"""Tools (function calling) through a live server with the official openai client (issue 17), in
isthmus's generic format (docs/api.md): the tools are described in the system turn, a call is the
JSON object {"tool_calls": [{"name", "arguments"}]} decoded under a grammar that holds each
function's parameters schema, and it comes back as OpenAI's `message.tool_calls` (streamed as
OpenAI streams them). The tiny random model could not write a call by itself, so every valid call
below is the grammar's doing; `jsonschema` is the oracle of the arguments."""

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
BOOK = {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31}},
        "required": ["day"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book", "description": "Book a day", "parameters": BOOK}}]
SCHEMAS = {"get_weather": WEATHER, "book": BOOK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(live, tmp_path_factory):
    """The tiny chat model with a context of 2,048 (the tools' description alone is ~700 of its
    byte-level tokens) behind the full app, open (no tenants file)."""
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.runtime.engine import Engine
    from tiny_models import write_tiny_chat_gguf

    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("tools") / "tiny-chat.gguf", context_length=2048)
    engine = Engine(isthmus.compile(isthmus.load(path), target="numba"), name="tiny-chat", max_batch=4)
    s = live.start(create_app(engine))
    s.model_id = "tiny-chat"
    yield s
    live.stop(s)


@pytest.fixture
def client(server):
    return server.client("open")


def _check_calls(calls, names=SCHEMAS):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _create(server, client, **kw):
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 500)
    return client.chat.completions.create(model=server.model_id, tools=TOOLS, **kw)


def test_required_tool_choice_gives_valid_calls(server, client):
    for seed in range(3):
        r = _create(server, client, tool_choice="required", temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)


def test_a_named_tool_and_one_call_at_most(server, client):
    r = _create(server, client, tool_choice={"type": "function", "function": {"name": "book"}},
                parallel_tool_calls=False, temperature=1.0, seed=3)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "book"
    _check_calls(calls, {"book"})


def test_auto_gives_a_valid_call_or_text(server, client):
    for seed in range(4):
        choice = _create(server, client, temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert isinstance(choice.message.content, str)


def test_streamed_calls_reassemble_to_the_non_streamed_ones(server, client):
    kw = dict(tool_choice="required", temperature=0)
    want = _create(server, client, **kw).choices[0].message.tool_calls
    with client.chat.completions.stream(model=server.model_id, messages=ASK, tools=TOOLS, max_tokens=500, **kw) as s:
        final = s.get_final_completion()
    got = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in got] == \
        [(c.function.name, c.function.arguments) for c in want]
    chunks = list(_create(server, client, stream=True, **kw))
    deltas = [tc for ch in chunks for c in ch.choices if c.delta.tool_calls for tc in c.delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == want[0].function.name and deltas[0].index == 0


def test_with_tools_a_text_reply_still_streams_as_text(server, client):
    """tool_choice none: never a call; the streamed text equals the non-streamed reply."""
    kw = dict(tool_choice="none", temperature=0, max_tokens=24)
    want = _create(server, client, **kw).choices[0].message.content
    chunks = list(_create(server, client, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    for seed in range(4):                       # auto: whichever the reply is, streamed == not streamed
        one = _create(server, client, temperature=1.0, seed=seed).choices[0].message
        streamed = list(_create(server, client, temperature=1.0, seed=seed, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        calls = [tc for c in streamed if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
        assert (text or None) == one.content and bool(calls) == bool(one.tool_calls)


def test_a_tool_round_trip(server, client):
    first = _create(server, client, tool_choice="required", temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = _create(server, client, messages=history, tool_choice="none", temperature=0, max_tokens=12)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    # the call and its result are in the prompt: it grew by at least the result's text
    assert r.usage.prompt_tokens > _create(server, client, tool_choice="none", max_tokens=1).usage.prompt_tokens + 5


@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    (dict(tool_choice="required", extra_body={"ignore_eos": True}), "ignore_eos"),
    (dict(messages=ASK + [{"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
])
def test_bad_tool_requests_are_400(server, client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _create(server, client, **kw)
    assert e.value.param == param


def test_a_bad_function_name_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, messages=ASK, max_tokens=4,
                                       tools=[{"type": "function", "function": {"name": "bad name"}}])
    assert e.value.param == "tools.0.function.name"


def test_tool_choice_without_tools_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, messages=ASK, tool_choice="required", max_tokens=4)
    assert e.value.param == "tool_choice"
