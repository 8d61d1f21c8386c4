"""The Chat Completions server, driven by the official `openai` client over real HTTP on 127.0.0.1."""

import json
import time

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "Hello there"}]


def _greedy(client, model, messages=USER, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_models_list_and_retrieve(server, client):
    ids = [m.id for m in client.models.list()]
    assert ids == [server.model_id]
    m = client.models.retrieve(server.model_id)
    assert m.id == server.model_id and m.object == "model" and m.owned_by == "isthmus"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert [m.id for m in server.client("other").models.list()] == []      # not on its allow-list


def test_non_streaming_chat_is_what_the_runtime_generates(server, client):
    r = _greedy(client, server.model_id, max_tokens=12)
    want, stats = server.tiny.expected(USER, max_tokens=12)
    assert r.object == "chat.completion" and r.model == server.model_id and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == stats.finish_reason
    assert r.usage.prompt_tokens == len(server.tiny.prompt_ids(USER))
    # the end-of-turn token that ends a "stop" reply is not counted as completion
    assert r.usage.completion_tokens == stats.eval_tokens - (stats.finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("isthmus-")


def test_streaming_equals_non_streaming_and_has_no_usage_without_opt_in(server, client):
    full = _greedy(client, server.model_id, max_tokens=16).choices[0].message.content
    chunks = list(_greedy(client, server.model_id, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)            # no usage chunk (choices: [])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert len({c.id for c in chunks}) == 1


def test_include_usage_sends_a_final_chunk_with_empty_choices(server, client):
    chunks = list(_greedy(client, server.model_id, max_tokens=7, stream=True,
                          stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert last.usage.prompt_tokens == len(server.tiny.prompt_ids(USER))
    assert last.usage.completion_tokens == 7 or chunks[-2].choices[0].finish_reason == "stop"
    assert text == _greedy(client, server.model_id, max_tokens=7).choices[0].message.content


def test_raw_sse_is_shaped_as_openai_sends_it(server):
    body = {"model": server.model_id, "messages": USER, "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    docs = [json.loads(e[6:]) for e in events[:-1]]
    assert docs[-1]["choices"] == [] and set(docs[-1]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all("usage" in d and d["usage"] is None for d in docs[:-1])
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}


def test_stop_strings_are_cut_and_not_echoed(server, client):
    full = _greedy(client, server.model_id, max_tokens=24).choices[0].message.content
    stop = full[5:7]
    want = full[:full.index(stop)]
    r = _greedy(client, server.model_id, max_tokens=24, stop=[stop, "never appears ~~~"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(_greedy(client, server.model_id, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(server, client):
    for kw in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        r = _greedy(client, server.model_id, **kw)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_n_choices_and_seed_reproducibility(server, client):
    kw = dict(model=server.model_id, messages=USER, temperature=1.0, max_tokens=10, seed=1234)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content      # each choice its own draw
    assert 2 <= a.usage.completion_tokens <= 20
    other = client.chat.completions.create(n=1, **{**kw, "seed": 99})
    assert other.choices[0].message.content != a.choices[0].message.content
    streamed = list(client.chat.completions.create(n=2, stream=True, **kw))
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == a.choices[i].message.content


def test_logprobs(server, client):
    r = _greedy(client, server.model_id, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)       # greedy picks the top
        assert item.bytes is not None
    assert _greedy(client, server.model_id, max_tokens=2).choices[0].logprobs is None


def test_bad_requests_are_400(server, client):
    m = server.model_id
    cases = [
        dict(messages=[{"role": "wizard", "content": "hi"}]),
        dict(messages=[{"role": "user", "content": 5}]),
        dict(messages=[]),
        dict(messages=USER, temperature="hot"),
        dict(messages=USER, temperature=3),
        dict(messages=USER, n=99),
        dict(messages=USER, max_tokens=0),
        dict(messages=USER, max_tokens=10_000),                    # over the context
        dict(messages=[{"role": "user", "content": "x" * 2000}]),  # the prompt alone is over the context
        dict(messages=USER, top_logprobs=2),                       # without logprobs
        dict(messages=USER, presence_penalty=3.0),                 # out of [-2, 2]
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ]
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=m, **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x" * 2000}])
    assert e.value.code == "context_length_exceeded" and "maximum context length is 256" in e.value.message


def test_content_parts_and_developer_role(server, client):
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    r = _greedy(client, server.model_id, messages=parts, max_tokens=5)
    want, _ = server.tiny.expected([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "Hello there"}], max_tokens=5)
    assert r.choices[0].message.content == want


def test_401_missing_or_wrong_key(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("sk-wrong-key-xxxxxxxxxxxx").chat.completions.create(model=server.model_id, messages=USER)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": server.model_id, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # authentication comes before validation, as with OpenAI
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401


def test_a_model_not_on_the_allow_list_is_not_told_apart_from_an_unknown_one(server):
    answers = []
    for model in (server.model_id, "no-such-model"):
        with pytest.raises(openai.NotFoundError) as e:
            server.client("other").chat.completions.create(model=model, messages=USER)
        answers.append(e.value.body["message"].replace(model, "M"))
        assert e.value.status_code == 404 and e.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            server.client("other").models.retrieve(model)
    assert answers[0] == answers[1] and server.model_id not in str(answers)


def test_404_unknown_model_and_url(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-99", messages=USER)
    assert e.value.code == "model_not_found" and server.model_id not in e.value.message   # served ids stay unsaid
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_413_body_over_the_limit(server, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "x" * (70 << 10)}])
    assert e.value.status_code == 413 and e.value.code == "request_too_large"

    def chunks():                       # no Content-Length: the limit holds as the body streams in
        for _ in range(80):
            yield b"x" * 1024
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert r.status_code == 413


def test_429_rate_limited_with_retry_after(server):
    c = server.client("limited")
    c.models.list()                                       # the one token of the bucket
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=server.model_id, messages=USER)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.code == "rate_limit_exceeded"
    assert server.state.metrics.rate_limited.value(tenant="limited") >= 1


def test_503_when_the_queue_is_full(server, client):
    engine = server.engine
    engine.hold()                       # nothing is admitted: requests pile up in the queue
    try:
        pending = [engine.submit([1, 2, 3], _params(), lambda ev: None, tenant="acme")       # acme fills it
                   for _ in range(engine.max_batch + engine.max_waiting)]
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=server.model_id, messages=USER, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "overloaded"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for t in pending:
            t.cancel()
        engine.hold(False)
    assert _greedy(client, server.model_id, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def _params(**kw):
    from isthmus.runtime.sampling import SamplingParams
    return SamplingParams(max_tokens=kw.get("max_tokens", 2))


def test_an_error_after_streaming_began_is_an_error_event_then_done(server, client):
    engine = server.engine
    real = engine.decode
    calls = []

    def failing(exe, decoders, tokens):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated device fault")
        return real(exe, decoders, tokens)

    engine.decode = failing
    try:
        stream = _greedy(client, server.model_id, max_tokens=50, stream=True)
        got = []
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                got.append(chunk)
        assert got and "internal error" in e.value.message
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {server.keys['acme']}"},
                       json={"model": server.model_id, "messages": USER, "max_tokens": 50, "stream": True})
        assert r.text.endswith("event: error\ndata: " + json.dumps({"error": {
            "message": "internal error while generating", "type": "server_error", "param": None, "code": None}})
            + "\n\ndata: [DONE]\n\n")
    finally:
        engine.decode = real
    assert _greedy(client, server.model_id, max_tokens=3).choices[0].finish_reason == "length"   # still serving


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    engine = server.engine
    steps = engine.steps
    with _greedy(client, server.model_id, max_tokens=200, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.waiting == 0
    assert engine.steps - steps < 150                  # it did not run on to max_tokens


def test_health_metrics_and_openapi(server, client):
    _greedy(client, server.model_id, max_tokens=2)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}          # no model list, no load
    admin = {"Authorization": f"Bearer {server.keys['admin']}"}
    text = httpx.get(server.url + "/metrics", headers=admin).text
    for name in ("isthmus_requests_total{", "isthmus_time_to_first_token_seconds_bucket{",
                 "isthmus_request_duration_seconds_count{", "isthmus_completion_tokens_total{",
                 "isthmus_prompt_tokens_total{", "isthmus_decode_batch_size_bucket{", "isthmus_running_sequences{"):
        assert name in text, name
    assert 'isthmus_requests_total{route="/v1/chat/completions",status="200"}' in text
    spec = httpx.get(server.url + "/openapi.json").json()
    statuses = set(spec["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= statuses


def test_no_malformed_input_gives_a_500(server):
    auth = {"Authorization": f"Bearer {server.keys['acme']}"}
    url = server.url + "/v1/chat/completions"
    bodies = [b"", b"null", b"[]", b"{", b'{"model": null}', b'{"model": "tiny-chat", "messages": "hi"}',
              b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
              b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
              b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
              b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}',
              b'{"model": "tiny-chat", "messages": [{"role": "assistant"}], "max_tokens": 2}',
              b'{"model": "tiny-chat", "messages": [{"role": "user"}]}',
              "{\"model\": \"tiny-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"<|im_end|>\U0001F600\"}], \"max_tokens\": 2}".encode(),
              b'\xff\xfe garbage']
    for body in bodies:
        for ctype in ("application/json", "text/plain"):
            r = httpx.post(url, content=body, headers={**auth, "Content-Type": ctype})
            assert r.status_code < 500, (body, ctype, r.text)
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/attestation", params={"nonce": "zz"})
    assert r.status_code == 400


def test_ignore_eos_extension_runs_to_max_tokens(server, client):
    r = _greedy(client, server.model_id, max_tokens=40, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
