"""Sampling controls through a live server with the official openai client (issue 17): logit_bias,
presence/frequency penalties and vLLM's top_k, min_p and repetition_penalty change the output
as their definitions say, and every field the server does not implement is a 400 naming it.

The oracle steps the reference decoder itself and applies each control's published definition
(OpenAI's API reference for the bias and penalties, vLLM's for repetition_penalty) in numpy."""

import collections

import numpy as np
import openai
import pytest

USER = [{"role": "user", "content": "Tell me about the sea."}]


def _oracle(tiny, n, bias=None, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy continuation with the controls applied to each step's logits."""
    ids = tiny.prompt_ids(USER)
    dec = tiny.exe.decoder()
    logits = np.asarray(dec.step(ids), np.float32)
    out, counts = [], collections.Counter()
    for _ in range(n):
        z = logits.copy()
        if repetition != 1.0:
            for t in set(ids) | set(out):
                z[t] = z[t] / repetition if z[t] > 0 else z[t] * repetition
        for t, c in counts.items():
            z[t] -= c * np.float32(frequency) + np.float32(presence)
        for t, b in (bias or {}).items():
            z[t] += b
        tok = int(np.argmax(z))
        out.append(tok)
        counts[tok] += 1
        logits = np.asarray(dec.step([tok]), np.float32)
    return out


def _reply(client, server, n, **kw):
    extra = kw.pop("extra_body", {})
    r = client.chat.completions.create(model=server.model_id, messages=USER, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True, **extra}, **kw)
    return r.choices[0].message.content


def _text(tiny, ids):
    return tiny.tokenizer.decode(ids, skip_special=True)


def test_logit_bias_keeps_a_token_out_or_forces_it(server, client):
    tiny = server.tiny
    plain = _oracle(tiny, 8)
    first = plain[0]
    without = _oracle(tiny, 8, bias={first: -100.0})
    assert first not in without                       # by the definition: never chosen again
    assert _reply(client, server, 8, logit_bias={str(first): -100}) == _text(tiny, without)
    forced_token = next(t for t in range(3, 200) if _text(tiny, [t]).isalpha())
    forced = _reply(client, server, 6, logit_bias={str(forced_token): 100})
    assert forced == _text(tiny, [forced_token] * 6)


@pytest.mark.parametrize("controls, oracle", [
    (dict(frequency_penalty=2.0), dict(frequency=2.0)),
    (dict(presence_penalty=2.0), dict(presence=2.0)),
    (dict(frequency_penalty=-1.0, presence_penalty=0.5), dict(frequency=-1.0, presence=0.5)),
    (dict(extra_body={"repetition_penalty": 1.8}), dict(repetition=1.8)),
])
def test_penalties_follow_their_definitions(server, client, controls, oracle):
    got = _reply(client, server, 32, **controls)
    assert got == _text(server.tiny, _oracle(server.tiny, 32, **oracle))


def test_penalties_change_the_token_counts(server, client):
    """On 48 greedy tokens, a frequency penalty spreads the output over more distinct tokens (the
    tiny model repeats itself without one)."""
    tiny = server.tiny
    plain = tiny.tokenizer.encode(_reply(client, server, 48))
    spread = tiny.tokenizer.encode(_reply(client, server, 48, frequency_penalty=2.0))
    assert max(collections.Counter(spread).values()) < max(collections.Counter(plain).values())
    assert len(set(spread)) > len(set(plain))


def test_top_k_and_min_p_narrow_sampling_to_the_greedy_token(server, client):
    greedy = _reply(client, server, 16)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(model=server.model_id, messages=USER, max_tokens=16, temperature=1.0,
                                           seed=7, extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].message.content == greedy, extra
    free = {client.chat.completions.create(model=server.model_id, messages=USER, max_tokens=16, temperature=1.0,
                                           seed=s, extra_body={"ignore_eos": True}).choices[0].message.content
            for s in range(4)}
    assert free != {greedy}                  # without them, temperature 1 does sample


@pytest.mark.parametrize("kw, param", [
    (dict(modalities=["text", "audio"]), "modalities"),
    (dict(functions=[{"name": "f", "parameters": {"type": "object"}}]), "functions"),
    (dict(prediction={"type": "content", "content": "x"}), "prediction"),
    (dict(extra_body={"temprature": 0.5}), "temprature"),
    (dict(messages=[{"role": "user", "content": "hi", "audio": {"id": "x"}}]), "messages.0.audio"),
    (dict(stream_options={"include_usage": True, "chunk_size": 3}, stream=True), "stream_options.chunk_size"),
])
def test_fields_the_server_does_not_implement_are_400_naming_them(server, client, kw, param):
    kw.setdefault("messages", USER)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, **kw)
    assert e.value.status_code == 400 and e.value.param == param
    assert f"Unrecognized request argument supplied: {param}" in e.value.message


@pytest.mark.parametrize("bias", [{"x": 5}, {"99999": 5}, {"5": 101}, {"5": -100.5}])
def test_bad_logit_bias_is_400(server, client, bias):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_id, messages=USER, max_tokens=2, logit_bias=bias)
    assert e.value.param == "logit_bias"
