"""Tools in the model's own chat-template format (issue 17): a template that knows tools and
writes Hermes-style `<tool_call>` calls (Qwen2.5, Qwen3, Hermes) gets `tools=` and renders calls
and results itself, and calls are decoded under a grammar of that format.

Oracles: transformers' own chat-template renderer (`render_jinja_template`) for the prompt a
conversation with tools must become, the template's own rendering of a call for what the grammar
must accept, `jsonschema` for the arguments, and the generic-format tests' round trip."""

import json

import jsonschema
import pytest

from tiny_models import HERMES_TEMPLATE, TEMPLATE, write_tiny_chat_gguf

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FUNCTION = {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}
TOOLS = [{"type": "function", "function": FUNCTION}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny chat model with the Hermes template, as the serving engine (tokenizer, vocab)."""
    import isthmus
    from isthmus.runtime.engine import Engine

    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("hermes") / "tiny-hermes.gguf", context_length=2048,
                                template=HERMES_TEMPLATE)
    return Engine(isthmus.compile(isthmus.load(path), target="numba"), name="tiny-hermes", max_batch=4)


@pytest.fixture(scope="module")
def server(live, model):
    from isthmus.interop.app import create_app

    s = live.start(create_app(model))
    s.model_id, s.engine = "tiny-hermes", model
    yield s
    live.stop(s)


@pytest.fixture
def client(server):
    return server.client("open")


def _oracle_ids(model, messages, tools):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered = render_jinja_template([messages], tools=tools, chat_template=HERMES_TEMPLATE,
                                     add_generation_prompt=True)
    text = rendered[0][0] if isinstance(rendered, tuple) else rendered[0]
    return model.tokenizer.encode(text)


def test_the_format_is_chosen_from_the_template(model):
    from isthmus.interop.tool_formats import GENERIC, HERMES, _knows_tools

    assert _knows_tools(HERMES_TEMPLATE) and not _knows_tools(TEMPLATE)
    assert HERMES.name == "hermes" and GENERIC.name == "generic"
    from isthmus.interop.tool_formats import tool_format
    assert tool_format(model.tokenizer) is HERMES


def test_the_prompt_is_what_transformers_renders(model):
    """Offered tools, an earlier call and its result reach the template in transformers' shapes."""
    from isthmus.interop import openai_api as api
    from isthmus.interop.tool_formats import HERMES

    args = {"city": "Paris", "unit": "c"}
    chat = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    messages = [api.ChatMessage.model_validate(m) for m in chat]
    tools = [api.ToolDef.model_validate(t) for t in TOOLS]
    got = api.prompt_ids(model, messages, None, tools)
    hf = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"}]
    assert got == _oracle_ids(model, hf, TOOLS)
    assert api.system_note(api.ChatCompletionRequest(model="m", messages=messages[:1], tools=tools), HERMES) is None


def test_the_grammar_accepts_the_template_s_own_rendering_of_calls(model):
    """What the template writes for an assistant turn with calls is a complete sentence of the
    call grammar, and reads back as the same calls."""
    from isthmus.interop.openai_api import ToolDef
    from isthmus.interop.tool_formats import HERMES
    from isthmus.runtime.constraints import Grammar

    calls = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}},
             {"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}]
    turn = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered = render_jinja_template([turn], chat_template=HERMES_TEMPLATE)
    text = (rendered[0][0] if isinstance(rendered, tuple) else rendered[0])
    body = text.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>\n")
    kind, spec = HERMES.grammar([ToolDef.model_validate(t) for t in TOOLS], parallel=True)
    grammar = Grammar.lark(model.tokenizer, model.vocab, spec)
    m = grammar.matcher()
    for token in model.tokenizer.encode(body, add_bos=False, add_eos=False):
        assert m.mask(__import__("numpy").zeros(model.vocab, "float32"))[token] == 0, body
        m.accept(token)
    assert m.complete
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in HERMES.parse(body)] == \
        [(c["name"], c["arguments"]) for c in calls]
    assert HERMES.parse("Sure! " + body) is None and HERMES.parse("no call") is None


def test_calls_in_the_native_format(server, client):
    for seed in range(3):
        r = client.chat.completions.create(model=server.model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=800)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert 1 <= len(choice.message.tool_calls) <= 4
        for c in choice.message.tool_calls:
            assert c.function.name == "get_weather"
            jsonschema.validate(json.loads(c.function.arguments), WEATHER)
    one = client.chat.completions.create(model=server.model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=1.0, seed=7, max_tokens=300)
    assert len(one.choices[0].message.tool_calls) == 1


def test_native_round_trip_streamed_and_in_the_responses_api(server, client):
    kw = dict(model=server.model_id, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_tokens=300)
    want = client.chat.completions.create(**kw).choices[0].message.tool_calls
    with client.chat.completions.stream(**kw) as s:
        final = s.get_final_completion()
    got = final.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in got] == [(c.function.name, c.function.arguments)
                                                                      for c in want]
    call = want[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=server.model_id, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=4)
    assert answer.choices[0].message.tool_calls is None
    hf = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "sunny, 21 C"}]
    # tool_choice none offers no tools, so the template renders the history without the tools list
    assert answer.usage.prompt_tokens == len(_oracle_ids(server.engine, hf, None))
    r = client.responses.create(model=server.model_id, input="What is the weather in Paris?", tool_choice="required",
                                tools=[{"type": "function", **FUNCTION}], parallel_tool_calls=False, temperature=0,
                                max_output_tokens=300)
    assert r.output[0].type == "function_call" and r.output[0].arguments == call.function.arguments


def test_auto_decides_by_the_first_token(server, client):
    """tool_choice auto: a reply that begins the opener is a call, whole; any other is text."""
    for seed in range(4):
        kw = dict(model=server.model_id, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=40)
        one = client.chat.completions.create(**kw).choices[0]
        if one.message.tool_calls:
            assert one.finish_reason == "tool_calls"
            for c in one.message.tool_calls:
                jsonschema.validate(json.loads(c.function.arguments), WEATHER)
        else:       # no token of text begins "<tool_call>" (this vocabulary spells "<" alone)
            assert not one.message.content.lstrip().startswith("<")
        streamed = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert (text or None) == one.message.content

