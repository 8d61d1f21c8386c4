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


# -- generated schemas ----------------------------------------------------------------------------

def _schemas():
    """Bounded JSON schemas of the kinds structured outputs take (nested objects, arrays, enums,
    numbers with bounds, optional fields): every string and array has a maximum size, so that a
    random model's reply ends within its budget, as a real schema's does with a real model."""
    from hypothesis import strategies as st

    leaf = st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(0, 100)),
        st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["a", "b", "yes", "no", 1, 2.5, None, True]),
                                                    min_size=1, max_size=4, unique_by=repr)),
    )

    def grow(inner):
        names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
        obj = st.builds(lambda props, req: {"type": "object", "properties": props,
                                            "required": [k for k in props if k in req],
                                            "additionalProperties": False},
                        st.dictionaries(names, inner, min_size=1, max_size=3), st.sets(names, max_size=3))
        arr = st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 3))
        return st.one_of(obj, arr)

    return st.recursive(leaf, grow, max_leaves=6).map(
        lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"value": s},
                                                        "required": ["value"], "additionalProperties": False})


@pytest.mark.slow
def test_generated_schemas_always_give_valid_replies(server, client):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_schemas())
    def check(schema):
        r = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "json"}],
                                           max_tokens=150, temperature=1.0, seed=0, response_format=_fmt(schema))
        assert r.choices[0].finish_reason == "stop", (schema, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    check()


def test_a_schema_description_reaches_the_model(server, client):
    """OpenAI: the description is "used by the model to determine how to respond": it goes into the
    system turn (so it is not accepted and dropped)."""
    def prompt_tokens(fmt):
        return client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "c"}],
                                              max_tokens=40, temperature=0, response_format=fmt).usage.prompt_tokens
    described = _fmt(COLOR)
    described["json_schema"]["description"] = "a colour and its shade"
    assert prompt_tokens(described) >= prompt_tokens(_fmt(COLOR)) + len("a colour and its shade")
