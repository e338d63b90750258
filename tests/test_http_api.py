"""The OpenAI-compatible HTTP API, driven by the real `openai` package against a live cluster."""

from __future__ import annotations

import functools
import json

import openai
import pytest
from serving_thread import ServingThread, http

from coordinator.api.http_api import Output
from coordinator.api.requests import Request
from coordinator.api.token_bytes import byte_decoder
from coordinator.demo import ModelSpec
from coordinator.serving.engine import FINISH_LENGTH, Chunk
from protos import inference_pb2, worker_pb2

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
    assert all(c.usage is None for c in chunks)
    # streamed with include_usage: one last chunk without choices carries the usage
    chunks = list(client.chat.completions.create(model=server.model_id, messages=MESSAGES,
                                                 max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].object == "chat.completion.chunk"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens,
            chunks[-1].usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    assert all(c.usage is None for c in chunks[:-1])
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
    assert [g.bytes for g in got] == [list(raw_bytes(server.tokenizer, t)) for t, _ in want]
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
    assert lp.text_offset[-1] <= len(c.choices[0].text)


def raw_bytes(tokenizer, token: int) -> bytes:
    """A byte-level BPE token's bytes, through GPT-2's table (the demo has no added tokens
    among ordinary ids)."""
    return bytes(byte_decoder()[ch] for ch in tokenizer.convert_ids_to_tokens(token))


def engine_chunks(tokenizer, ids: list[int]) -> list[Chunk]:
    """The chunks the engine streams for these sampled tokens (no stop strings)."""
    detok = tokenizer.detokenizer
    out = []
    for i, t in enumerate(ids):
        detok.add_token(t)
        out.append(Chunk(text=detok.last_segment, token_ids=[t], logprobs=[-0.1 * i],
                         top_logprobs=[[(t, -0.1 * i), (ids[0], -9.0)]]))
    detok.finalize()
    out.append(Chunk(text=detok.last_segment, finish_reason=FINISH_LENGTH,
                     usage=inference_pb2.Usage(prompt_tokens=1, completion_tokens=len(ids))))
    return out


def test_logprobs_bytes_are_raw_and_text_offsets_follow_the_text(server):
    tok = server.tokenizer
    text = "naïve café ☕ ok"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    assert "\ufffd" in pieces  # some tokens are parts of a UTF-8 character
    chunks = engine_chunks(tok, ids)
    # chat: `bytes` is each token's own bytes, not the UTF-8 of its lossy decode
    chat = Output(Request(logprobs=True, top_logprobs=2), True, "m", tok).whole(chunks)
    content = chat["choices"][0]["logprobs"]["content"]
    assert chat["choices"][0]["message"]["content"] == text
    assert [e["bytes"] for e in content] == [list(raw_bytes(tok, t)) for t in ids]
    assert [e["top_logprobs"][0]["bytes"] for e in content] == [e["bytes"] for e in content]
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == text
    assert content[2]["bytes"] == [0xC3] and content[2]["token"] == "\ufffd"
    # completions: text_offset is where each token's text begins in `text` (a token of a
    # partial character, or a held-back lone space, begins where the unsent text does)
    whole = Output(Request(logprobs=True), False, "m", tok).whole(chunks)
    assert whole["choices"][0]["text"] == text
    offsets = whole["choices"][0]["logprobs"]["text_offset"]
    assert pieces == ["n", "a", "\ufffd", "\ufffd", "v", "e", " c", "a", "f", "\ufffd",
                      "\ufffd", " ", "\ufffd", "\ufffd", "\ufffd", " o", "k"]
    assert offsets == [0, 1, 2, 2, 3, 4, 5, 7, 8, 9, 9, 10, 10, 10, 10, 12, 14]
    assert text[offsets[6]:].startswith(" c") and text[offsets[-1]:] == "k"
    # streamed, the offsets are the same
    out = Output(Request(logprobs=True, stream=True), False, "m", tok)
    streamed = [x for c in chunks for x in
                (out.piece(c.text, [c])["choices"][0]["logprobs"]["text_offset"])]
    assert streamed == offsets


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
    # strings that are not Unicode (a lone UTF-16 surrogate), named by their path
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, None, 400,
     "messages[0].content", "not valid Unicode"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, None,
     400, "messages[0].content[0].text", "not valid Unicode"),
    ({"stop": "\udc00"}, None, 400, "stop", "not valid Unicode"),
    ({"stop": ["ok", "\ud800x"]}, None, 400, "stop[1]", "not valid Unicode"),
    ({"user": "\ud800"}, None, 400, "user", "not valid Unicode"),
    # stream_options needs stream: true; its fields are named under it
    ({"stream_options": {"include_usage": True}}, None, 400, "stream_options", "stream: true"),
    ({"stream": False, "stream_options": {}}, None, 400, "stream_options", "stream: true"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, None, 400,
     "stream_options.include_usage", "true or false"),
    # the context: the prompt's field is named, and max_tokens as the client set it (or not)
    ({"max_tokens": 2040}, None, 400, "messages", "with max_tokens 2040"),
    ({"max_completion_tokens": 2040}, None, 400, "messages", "with max_completion_tokens 2040"),
    ({"messages": [{"role": "user", "content": "the dog " * 1200}]}, None, 400, "messages",
     "max_tokens was not set"),
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


COMPLETIONS_BAD = [  # (body, param, words in the message)
    ({"prompt": "\ud800"}, "prompt", "not valid Unicode"),
    ({"prompt": ["ok \udbff"]}, "prompt[0]", "not valid Unicode"),
    ({"prompt": "hi", "stop": "\udc00"}, "stop", "not valid Unicode"),
    ({"prompt": [20, 10**6]}, "prompt", "prompt[1] is 1000000, outside the vocabulary"),
    ({"prompt": [20] * 3000}, "prompt", "max_tokens was not set"),
    ({"prompt": [20] * 3000, "max_tokens": 4}, "prompt", "with max_tokens 4 that exceeds"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     "stream: true"),
]


@pytest.mark.parametrize("body,param,words", COMPLETIONS_BAD,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(COMPLETIONS_BAD)])
def test_bad_completions_name_the_field_as_sent(server, body, param, words):
    code, reply = http("POST", server.http_url + "/v1/completions", json.dumps(body).encode())
    assert code == 400, reply
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


def scraped(server, name: str) -> float:
    """One sample's value from the coordinator's /metrics (0 when absent)."""
    import urllib.request

    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_a_client_that_leaves_a_whole_response_frees_its_slot_and_kv(server):
    import socket
    import time

    engine = server.coordinator.engine

    async def infos() -> list[int]:
        return [(await w.stub.Info(worker_pb2.InfoRequest())).sessions
                for w in server.coordinator.cluster.workers]

    def sessions() -> list[int]:
        return server.call(infos())

    def wait(cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)
        return cond()

    finished = 'shardline_request_success_total{finished_reason="length"}'
    cancelled = 'shardline_request_failure_total{reason="cancelled"}'
    def held(extra: int) -> bool:  # every stage holds the prefix cache's sequences + extra
        return sessions() == [len(engine.prefix) + extra] * len(server.coordinator.cluster.workers)

    assert wait(lambda: held(0), 5)  # earlier tests' releases have all arrived
    counts = scraped(server, finished), scraped(server, cancelled)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2000}).encode()
    sock = socket.create_connection(("127.0.0.1", server.coordinator.http_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait(lambda: engine.scheduler.running == 1 and held(1), 30)
    sock.close()  # the client gives up before the (not streamed) response is ready
    t0 = time.monotonic()
    assert wait(lambda: engine.scheduler.running == 0, 10)
    freed = time.monotonic() - t0
    assert wait(lambda: held(0), 5)
    # it was stopped, not run to its 2000 tokens
    assert (scraped(server, finished), scraped(server, cancelled)) == (counts[0], counts[1] + 1)
    assert freed < 3, freed
