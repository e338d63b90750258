"""The OpenAI-compatible HTTP API, driven by the real `openai` package against a live cluster."""

from __future__ import annotations

import functools
import json

import openai
import pytest
from serving_thread import ServingThread, http

from coordinator.demo import ModelSpec

SPEC = ModelSpec(family="llama")
MESSAGES = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@functools.lru_cache(maxsize=4)
def _loaded(path):
    from mlx_lm.utils import load_model

    from coordinator.app import load_tokenizer

    return load_model(path)[0], load_tokenizer(path)


def reference(path, ids, n, repetition_penalty=None, top=0):
    """Greedy (token, logprob) pairs from single-process mlx-lm (+ the `top` best logprobs)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    net, _ = _loaded(path)
    procs = make_logits_processors(repetition_penalty=repetition_penalty)
    steps = generate_step(mx.array(ids), net, max_tokens=n, logits_processors=procs)
    if top:
        return [(t, sorted(lp.tolist(), reverse=True)[:top]) for t, lp in steps]
    return [(t, lp[t].item()) for t, lp in steps]


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers[:2]) as s:
        s.path = model_dir(SPEC)
        s.tokenizer = _loaded(s.path)[1]
        s.model_id = s.coordinator.model.model_id
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_completions_whole_and_streamed_match_mlx_lm(server, client):
    ids = server.tokenizer.encode("The quick brown fox")
    want = reference(server.path, ids, 12)
    r = client.completions.create(model=server.model_id, prompt="The quick brown fox",
                                  max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == server.model_id
    assert r.choices[0].text == server.tokenizer.decode([t for t, _ in want])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(ids), 12, len(ids) + 12)
    # token ids as the prompt, streamed, with the usage chunk at the end
    chunks = list(client.completions.create(model=server.model_id, prompt=ids, max_tokens=12,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_applies_the_template_over_system_and_turns(server, client):
    ids = server.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                               tokenize=True)
    want = server.tokenizer.decode([t for t, _ in reference(server.path, ids, 10)])
    r = client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=10)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=server.model_id, messages=MESSAGES,
                                            max_tokens=10, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    # content as a list of text parts is the same message
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    r2 = client.chat.completions.create(model=server.model_id, messages=parts, max_tokens=10)
    assert r2.choices[0].message.content == want


def test_stop_strings_cut_whole_and_streamed_text_without_leaking(server, client):
    base = client.completions.create(model="", prompt="Water boils at", max_tokens=24)
    text = base.choices[0].text
    stop = text[9:13]  # spans several tokens, never at the start
    cut = text[: text.find(stop)]
    for stops in (stop, [stop, "never appears"]):
        r = client.completions.create(model="", prompt="Water boils at", max_tokens=24,
                                      stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    pieces = [c.choices[0].text for c in client.completions.create(
        model="", prompt="Water boils at", max_tokens=24, stop=stop, stream=True)]
    assert "".join(pieces) == cut  # no piece of the stop string was ever sent
    msgs = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="", messages=msgs, max_tokens=20)
    ctext = chat.choices[0].message.content
    cstop = ctext[5:8]
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="", messages=msgs, max_tokens=20, stop=cstop, stream=True)]
    assert "".join(deltas) == ctext[: ctext.find(cstop)]


def test_seed_gives_the_same_sample_and_sampling_params_apply(server, client):
    def sample(**kw):
        r = client.completions.create(model="", prompt="It was a bright", max_tokens=16,
                                      temperature=1.0, **kw)
        return r.choices[0].text

    assert sample(seed=7) == sample(seed=7)
    assert len({sample(seed=s) for s in (1, 2, 3)}) > 1
    streamed = client.completions.create(model="", prompt="It was a bright", max_tokens=16,
                                         temperature=1.0, seed=7, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == sample(seed=7)
    greedy = client.completions.create(model="", prompt="It was a bright", max_tokens=16)
    # top_k=1 (an extra body field, as with vLLM) makes any temperature greedy
    assert sample(seed=5, extra_body={"top_k": 1}) == greedy.choices[0].text
    assert sample(seed=5, top_p=1e-6) == greedy.choices[0].text
    assert sample(seed=5, extra_body={"min_p": 1.0}) == greedy.choices[0].text
    # repetition_penalty equals mlx-lm's processor over prompt + output
    ids = server.tokenizer.encode("It was a bright")
    want = reference(server.path, ids, 16, repetition_penalty=1.8)
    r = client.completions.create(model="", prompt=ids, max_tokens=16,
                                  extra_body={"repetition_penalty": 1.8})
    assert r.choices[0].text == server.tokenizer.decode([t for t, _ in want])


def test_logprobs_are_the_chosen_tokens_log_probabilities(server, client):
    ids = server.tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True,
                                               tokenize=True)
    want = reference(server.path, ids, 8)
    r = client.chat.completions.create(model="", messages=MESSAGES[:2], max_tokens=8,
                                       logprobs=True)
    got = r.choices[0].logprobs.content
    assert [g.token for g in got] == [server.tokenizer.decode([t]) for t, _ in want]
    assert [g.logprob for g in got] == pytest.approx([lp for _, lp in want], abs=1e-3)
    assert all(g.bytes == list(g.token.encode()) for g in got)
    streamed = client.chat.completions.create(model="", messages=MESSAGES[:2], max_tokens=8,
                                              logprobs=True, stream=True)
    lps = [x.logprob for c in streamed if c.choices and c.choices[0].logprobs
           for x in c.choices[0].logprobs.content]
    assert lps == pytest.approx([lp for _, lp in want], abs=1e-3)
    best = reference(server.path, ids, 8, top=3)
    r = client.chat.completions.create(model="", messages=MESSAGES[:2], max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    for g, (t, values) in zip(r.choices[0].logprobs.content, best, strict=True):
        assert [a.logprob for a in g.top_logprobs] == pytest.approx(values, abs=1e-3)
        assert g.top_logprobs[0].logprob == pytest.approx(g.logprob, abs=1e-6)  # greedy
        assert g.top_logprobs[0].token == g.token == server.tokenizer.decode([t])
    c = client.completions.create(model="", prompt=ids, max_tokens=8, logprobs=2)
    assert [sorted(d.values(), reverse=True) for d in c.choices[0].logprobs.top_logprobs] == \
        [pytest.approx(v[:len(d)], abs=1e-3) for (_, v), d in
         zip(best, c.choices[0].logprobs.top_logprobs, strict=True)]
    c = client.completions.create(model="", prompt=ids, max_tokens=8, logprobs=0)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x for _, x in want], abs=1e-3)
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id]
    assert client.models.retrieve(server.model_id).id == server.model_id
    assert http("GET", server.http_url + "/health") == (200, {"status": "ok"})


BAD = [  # (body or raw bytes, content type, status, param, words in the message)
    ({"max_tokens": -3}, None, 400, "max_tokens", ">= 1"),
    ({"max_tokens": 10**12}, None, 400, "max_tokens", "context"),
    ({"max_completion_tokens": 0}, None, 400, "max_completion_tokens", ">= 1"),
    ({"temperature": -0.5}, None, 400, "temperature", ">= 0"),
    ({"temperature": "hot"}, None, 400, "temperature", "number"),
    ({"top_p": 1.5}, None, 400, "top_p", "(0, 1]"),
    ({"top_logprobs": 3}, None, 400, "top_logprobs", "logprobs"),
    ({"n": 2}, None, 400, "n", "must be 1"),
    ({"stop": [""]}, None, 400, "stop[0]", "empty"),
    ({"messages": []}, None, 400, "messages", "empty"),
    ({"messages": None}, None, 400, "messages", "required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role",
     "'wizard'"),
    ({"messages": [{"content": "hi"}]}, None, 400, "messages[0].role", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, 400,
     "messages[0].content[0]", "text part"),
    ({"model": "gpt-9"}, None, 404, "model", "'gpt-9'"),
    (b'{"messages": [', None, 400, "body", "not valid JSON"),
    (b"[1, 2]", None, 400, "body", "JSON object"),
    (b"messages=hi", "application/x-www-form-urlencoded", 400, "Content-Type",
     "application/json"),
]


@pytest.mark.parametrize("body,ctype,status,param,words", BAD,
                         ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_refused_with_openai_errors(server, body, ctype, status, param, words):
    if isinstance(body, dict):
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode()
    code, reply = http("POST", server.http_url + "/v1/chat/completions", body,
                       ctype or "application/json")
    assert code == status, reply
    err = reply["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["message"].startswith(param) and err["type"] == "invalid_request_error"


def test_bad_input_through_openai_raises_and_serving_goes_on(server, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="", messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="", prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="", prompt=[20] * 5000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="", prompt=[10**6], max_tokens=4)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
    assert e.value.body["code"] == "model_not_found"
    for method, path in (("GET", "/v1/nothing"), ("GET", "/v1/chat/completions")):
        code, reply = http(method, server.http_url + path)
        assert code in (404, 405) and "message" in reply["error"]
    r = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    import time

    engine = server.coordinator.engine
    stream = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=500,
                                            stream=True)
    next(iter(stream))
    assert engine.scheduler.running == 1
    stream.close()
    deadline = time.monotonic() + 10
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.running == 0
