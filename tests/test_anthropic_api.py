"""Anthropic's Messages API (`/v1/messages`), driven by the real `anthropic` package."""

from __future__ import annotations

import json
import time

import anthropic
import jsonschema
import pytest
from conftest import reference_tokens
from serving_thread import ServingThread

from coordinator.demo import ModelSpec

SPEC = ModelSpec(family="llama")
KEY = "an-api-key-for-these-tests"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "required": ["city"],
                            "properties": {"city": {"type": "string", "maxLength": 12}}}}


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers[:2], api_key=KEY) as s:
        s.path = model_dir(SPEC)
        s.model_id = s.coordinator.model.model_id
        s.tokenizer = s.coordinator.engine.tokenizer
        yield s


@pytest.fixture
def client(server):
    with anthropic.Anthropic(base_url=server.http_url, api_key=KEY, max_retries=0) as c:
        yield c


def expected(server, system: str, user: str, n: int) -> tuple[str, int]:
    """The text and token count single-process mlx-lm gives for this conversation."""
    ids = server.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        add_generation_prompt=True, tokenize=True)
    tokens = reference_tokens(server.path, list(ids), n)
    return server.tokenizer.decode(tokens), len(tokens)


def test_messages_whole_and_streamed_are_token_exact(server, client):
    text, count = expected(server, "Be brief.", "Name a colour.", 12)
    r = client.messages.create(model=server.model_id, max_tokens=12, system="Be brief.",
                               messages=[{"role": "user", "content": "Name a colour."}])
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.content[0].type == "text" and r.content[0].text == text
    assert r.usage.output_tokens == count and r.usage.input_tokens > 0
    assert r.stop_reason == ("max_tokens" if count == 12 else "end_turn")
    blocks = [{"type": "text", "text": "Name a colour."}]
    with client.messages.stream(
            model=server.model_id, max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": blocks}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.usage.output_tokens == count


def test_a_tool_is_called_and_its_result_goes_back(server, client):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.messages.create(model=server.model_id, max_tokens=80, messages=messages,
                               tools=[WEATHER], tool_choice={"type": "tool",
                                                             "name": "get_weather"},
                               extra_body={"temperature": 0.7})
    assert r.stop_reason == "tool_use", r
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(model=server.model_id, max_tokens=80, messages=messages,
                                tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                extra_body={"temperature": 0.7}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use", final
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(streamed.input, WEATHER["input_schema"])
    follow = messages + [
        {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": json.dumps({"celsius": 3})}]}]
    r2 = client.messages.create(model=server.model_id, max_tokens=6, messages=follow,
                                tools=[WEATHER])
    assert r2.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_bad_requests_get_anthropics_error_shape_naming_the_field(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:  # the SDK insists on max_tokens
        client.post("/v1/messages", cast_to=object, body={
            "model": server.model_id, "messages": [{"role": "user", "content": "hi"}]})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    cases = [
        (dict(max_tokens=5, messages=[{"role": "user", "content": "hi"}],
              stop_sequences=[""]), "stop_sequences"),
        (dict(max_tokens=5, messages=[{"role": "robot", "content": "hi"}]), "role"),
        (dict(max_tokens=5, messages=[{"role": "user", "content": "hi"}],
              extra_body={"temperature": -1}),
         "temperature"),
    ]
    for kwargs, field in cases:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model=server.model_id, **kwargs)
        assert e.value.body["type"] == "error", e.value.body
        assert e.value.body["error"]["type"] == "invalid_request_error"
        message = e.value.body["error"]["message"]
        assert field in message and message.count(field) == 1, (field, message)
    with anthropic.Anthropic(base_url=server.http_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model=server.model_id, max_tokens=5,
                                messages=[{"role": "user", "content": "hi"}])


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    engine = server.coordinator.engine
    with client.messages.stream(model=server.model_id, max_tokens=400,
                                messages=[{"role": "user", "content": "Go on and on."}]) as s:
        next(iter(s.text_stream))
        assert engine.scheduler.running == 1
    deadline = time.monotonic() + 30
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.running == 0
