"""Ollama's API (`/api/*`), driven by the real `ollama` package."""

from __future__ import annotations

import json
import time

import jsonschema
import ollama
import pytest
from conftest import reference_tokens
from serving_thread import ServingThread

from coordinator.demo import ModelSpec

SPEC = ModelSpec(family="llama")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n"],
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers[:2]) as s:
        s.path = model_dir(SPEC)
        s.model_id = s.coordinator.model.model_id
        s.tokenizer = s.coordinator.engine.tokenizer
        yield s


@pytest.fixture
def client(server):
    return ollama.Client(host=server.http_url)


def test_chat_and_generate_are_token_exact_whole_and_streamed(server, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True)
    tokens = reference_tokens(server.path, list(ids), 12)
    detok = server.tokenizer.detokenizer  # mlx-lm's own text of those tokens
    detok.reset()
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    text = detok.text
    r = client.chat(model=f"{server.model_id}:latest", messages=messages,
                    options={"num_predict": 12, "temperature": 0})
    assert r.message.role == "assistant" and r.message.content == text
    assert r.done and r.eval_count == len(tokens) and r.prompt_eval_count == len(ids)
    assert r.done_reason == ("length" if len(tokens) == 12 else "stop")
    parts = list(client.chat(model=server.model_id, messages=messages, stream=True,
                             options={"num_predict": 12}))
    assert "".join(p.message.content for p in parts) == text
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    g = list(client.generate(model=server.model_id, prompt="Name a colour.", stream=True,
                             options={"num_predict": 12}))
    assert "".join(p.response for p in g) == text and g[-1].eval_count == len(tokens)


def test_format_json_schema_is_always_valid(server, client):
    for seed in range(4):
        r = client.chat(model=server.model_id, format=SCHEMA,
                        messages=[{"role": "user", "content": "A city as JSON"}],
                        options={"num_predict": 80, "temperature": 0.8, "seed": seed})
        if r.done_reason == "stop":
            jsonschema.validate(json.loads(r.message.content), SCHEMA)
    r = client.generate(model=server.model_id, prompt="JSON:", format="json",
                        options={"num_predict": 60, "temperature": 0.5, "seed": 1})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)


def test_the_model_is_listed_shown_and_running(server, client):
    (listed,) = client.list().models
    assert listed.model == server.model_id and listed.size > 0
    assert [m.model for m in client.ps().models] == [server.model_id]
    shown = client.show(server.model_id)
    assert shown.details.family == "llama" and "tools" in shown.capabilities
    assert client._client.get("/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404


def test_bad_requests_name_the_ollama_fields(server, client):
    for options, field in (({"num_predict": 0}, "options.num_predict"),
                           ({"temperature": -1}, "options.temperature"),
                           ({"stop": [""]}, "options.stop")):
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=server.model_id, options=options,
                        messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 400 and field in e.value.error, e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="other", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    engine = server.coordinator.engine
    stream = client.chat(model=server.model_id, stream=True, options={"num_predict": 400},
                         messages=[{"role": "user", "content": "Go on."}])
    next(stream)
    assert engine.scheduler.running == 1
    stream.close()
    deadline = time.monotonic() + 30
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.running == 0
