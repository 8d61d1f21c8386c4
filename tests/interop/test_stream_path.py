"""The lean SSE path (issue 16, item 1): chunks spliced from a head encoded once per stream carry
what a chunk built as a whole object carried: text, logprobs, finish reasons, the tier."""

from __future__ import annotations

import json

import httpx

USER = [{"role": "user", "content": "Hello there"}]


def _sse(server, **body):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {server.keys['acme']}"},
                   json={"model": server.model_id, "messages": USER, "temperature": 0, "stream": True, **body},
                   timeout=60)
    assert r.status_code == 200
    events = [ln[len("data: "):] for ln in r.text.split("\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_logprobs_equal_the_completions(server, client):
    whole = client.chat.completions.create(model=server.model_id, messages=USER, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=2)
    chunks = _sse(server, max_tokens=6, logprobs=True, top_logprobs=2)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[0]["choices"][0]["logprobs"] == {"content": None, "refusal": None}
    entries = [e for c in chunks for e in c["choices"][0]["logprobs"]["content"] or []]
    assert [e["token"] for e in entries] == [e.token for e in whole.choices[0].logprobs.content]
    assert [e["logprob"] for e in entries] == [e.logprob for e in whole.choices[0].logprobs.content]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_every_chunk_has_the_head_and_one_choice(server):
    chunks = _sse(server, max_tokens=5, n=2, stream_options={"include_usage": True})
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["service_tier"] == "default" and c["model"] == server.model_id for c in chunks)
    body = [c for c in chunks if c["choices"]]
    assert all(len(c["choices"]) == 1 and c["usage"] is None and c["choices"][0]["logprobs"] is None for c in body)
    assert sorted(c["choices"][0]["index"] for c in body if c["choices"][0]["finish_reason"]) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 10


def test_text_is_spliced_as_valid_json():
    from isthmus.interop.openai_api import _text
    for text in ['say "hi"\n', "back\\slash", "é ü 中文 🙂", "\u2028\x00\t", ""]:
        assert json.loads(_text(text)) == text
