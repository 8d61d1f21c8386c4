"""response_format through a live server with the official openai client (issue 17): replies are
decoded under the JSON schema's grammar (runtime/constraints.py, llguidance), so they parse and
validate by construction; the oracle is the `jsonschema` package (and pydantic, through the
client's own `parse`). The tiny random model shows the mask at work (it could never write JSON
by itself); the default model shows real replies."""

import json

import jsonschema
import openai
import pydantic
import pytest

COLOR = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                          "shade": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["color", "shade"], "additionalProperties": False}


def _fmt(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_the_tiny_random_model_writes_valid_json_under_a_schema(server, client):
    for seed in range(4):
        r = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "colour?"}],
                                           max_tokens=40, temperature=1.0, seed=seed, response_format=_fmt(COLOR))
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), COLOR)


def test_streamed_structured_reply_is_the_same_json(server, client):
    kw = dict(model=server.model_id, messages=[{"role": "user", "content": "colour?"}], max_tokens=40,
              temperature=0, response_format=_fmt(COLOR))
    full = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full and jsonschema.validate(json.loads(full), COLOR) is None


@pytest.mark.parametrize("fmt", [
    _fmt({"type": "object", "properties": {"x": {"type": "strin"}}}),          # no such type
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": COLOR}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": COLOR, "extra": 1}},
    {"type": "xml"},
])
def test_unusable_response_formats_are_400_naming_it(server, client, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format=fmt)
    assert e.value.status_code == 400 and e.value.param.startswith("response_format")


def test_ignore_eos_with_a_schema_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format=_fmt(COLOR), extra_body={"ignore_eos": True})
    assert e.value.param == "ignore_eos"


# -- the default model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm(live, default_model):
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.runtime.engine import Engine

    engine = Engine(isthmus.compile(default_model, target="numba"), name="smollm2", max_batch=4)
    s = live.start(create_app(engine))
    yield s, s.client("open", timeout=300)
    live.stop(s)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog", "fish"]})
    age: int = pydantic.Field(ge=0, le=30)


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    pets: list[Pet] = pydantic.Field(max_length=3)
    nickname: str | None = None


@pytest.mark.slow
def test_json_object_replies_of_the_default_model_parse(smollm):
    s, client = smollm
    r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Describe a cat as a JSON object."}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.slow
def test_the_clients_parse_helper_gets_a_validated_object(smollm):
    s, client = smollm
    r = client.chat.completions.parse(model="smollm2", temperature=0, max_tokens=300, response_format=Owner,
                                      messages=[{"role": "user", "content": "Alice has a cat called Tom, aged 3."}])
    owner = r.choices[0].message.parsed
    assert isinstance(owner, Owner) and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), Owner.model_json_schema())
