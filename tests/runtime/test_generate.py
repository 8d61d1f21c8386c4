"""The generation loop: KV-cache decoding equals a full forward pass; sampling follows its distribution."""

import numpy as np
import pytest

import isthmus
from isthmus.errors import InputError
from isthmus.runtime.generate import GenerationStats, generate
from isthmus.runtime.sampling import Sampler, SamplingParams
from isthmus.runtime.sequence import _held_back


@pytest.fixture
def tiny_exe(tiny_model):
    return isthmus.compile(tiny_model)


def _full_logits(exe, ids):
    cfg = exe.model.config
    feeds = {f"past_{kind}.{i}": np.zeros((1, cfg["n_kv_heads"], 0, cfg["head_dim"]), np.float32)
             for i in range(cfg["n_layers"]) for kind in ("key", "value")}
    feeds["input_ids"] = np.asarray([ids], np.int64)
    feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    return exe.run(feeds)["logits"][0]


def test_kv_cache_decode_matches_full_forward(tiny_exe):
    prompt = [3, 14, 15, 9, 26]
    stats = GenerationStats()
    out = list(generate(tiny_exe, prompt, SamplingParams(max_tokens=12), stats))
    assert len(out) == 12 and stats.finish_reason == "length"
    assert stats.prompt_tokens == 5 and stats.eval_tokens == 12
    # greedy decoding: each generated token is the argmax of a full forward pass over everything before it
    full = _full_logits(tiny_exe, prompt + out[:-1])
    assert list(np.argmax(full[len(prompt) - 1:], axis=-1)) == out


def test_prompt_longer_than_context_is_a_clear_error(tiny_exe):
    with pytest.raises(InputError, match="context window is 64"):
        list(generate(tiny_exe, list(range(1, 61)) + [1, 2, 3, 4], SamplingParams()))


def test_generation_stops_at_the_context_end(tiny_exe):
    stats = GenerationStats()
    out = list(generate(tiny_exe, list(range(1, 61)), SamplingParams(max_tokens=100), stats))
    assert len(out) == 4 and stats.finish_reason == "length"


def test_stop_token_ends_generation(tiny_exe):
    first = list(generate(tiny_exe, [1, 2, 3], SamplingParams(max_tokens=5)))
    stats = GenerationStats()
    out = list(generate(tiny_exe, [1, 2, 3], SamplingParams(max_tokens=5), stats, stop_ids={first[2]}))
    assert out == first[:2] and stats.finish_reason == "stop"


LOGITS = np.log(np.array([0.05, 0.4, 0.25, 0.2, 0.1]))


def _draw(params, n=20000):
    s = Sampler(params)
    return np.bincount([s(LOGITS) for _ in range(n)], minlength=LOGITS.size) / n


def test_temperature_one_samples_the_softmax():
    freq = _draw(SamplingParams(temperature=1.0, seed=1))
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.015)


def test_temperature_sharpens():
    freq = _draw(SamplingParams(temperature=0.5, seed=2))
    p = np.exp(LOGITS / 0.5)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


def test_top_k_and_top_p_restrict_support():
    assert set(np.nonzero(_draw(SamplingParams(temperature=1.0, top_k=2, seed=3), 3000))[0]) == {1, 2}
    # nucleus 0.6: 0.4 + 0.25 reaches it, so tokens 1 and 2 only, renormalised
    freq = _draw(SamplingParams(temperature=1.0, top_p=0.6, seed=4), 10000)
    np.testing.assert_allclose(freq, [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0], atol=0.02)


def test_seed_reproducible_and_greedy_is_argmax():
    a = [Sampler(SamplingParams(temperature=0.8, seed=7))(LOGITS) for _ in range(1)]
    s1, s2 = Sampler(SamplingParams(temperature=0.8, seed=7)), Sampler(SamplingParams(temperature=0.8, seed=7))
    assert [s1(LOGITS) for _ in range(50)] == [s2(LOGITS) for _ in range(50)]
    assert a and Sampler(SamplingParams())(LOGITS) == 1


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_params(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad)


def test_held_back_is_the_longest_stop_prefix():
    assert _held_back("Hello Par", ["Paris"]) == 3
    assert _held_back("Hello", ["Paris"]) == 0
    assert _held_back("ab", ["bc", "abc"]) == 2


@pytest.mark.slow
def test_stop_string_is_cut_and_not_echoed(default_exe):
    s = isthmus.chat(default_exe, [{"role": "user", "content": "What is the capital of France?"}],
                     max_tokens=30, stop=["Paris"])
    text = "".join(s)
    assert "Paris" not in text and text.startswith("The capital of France is")
    assert s.stats.finish_reason == "stop"


@pytest.mark.slow
def test_max_tokens_gives_length(default_exe):
    s = isthmus.chat(default_exe, [{"role": "user", "content": "Tell me a long story."}], max_tokens=5)
    "".join(s)
    assert s.stats.eval_tokens == 5 and s.stats.finish_reason == "length"
