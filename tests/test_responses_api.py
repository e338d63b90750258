"""OpenAI's Responses API (`/v1/responses`), driven by the real `openai` package."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from conftest import reference_tokens
from serving_thread import ServingThread

from coordinator.demo import ModelSpec

SPEC = ModelSpec(family="llama")
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 12}}}}


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers[:2]) as s:
        s.path = model_dir(SPEC)
        s.model_id = s.coordinator.model.model_id
        s.tokenizer = s.coordinator.engine.tokenizer
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def expected(server, instructions: str, user: str, n: int) -> tuple[str, int]:
    ids = server.tokenizer.apply_chat_template(
        [{"role": "system", "content": instructions}, {"role": "user", "content": user}],
        add_generation_prompt=True, tokenize=True)
    tokens = reference_tokens(server.path, list(ids), n)
    return server.tokenizer.decode(tokens), len(tokens)


def test_responses_whole_and_streamed_are_token_exact(server, client):
    text, count = expected(server, "Be brief.", "Name a colour.", 12)
    r = client.responses.create(model=server.model_id, instructions="Be brief.",
                                input="Name a colour.", max_output_tokens=12)
    assert r.id.startswith("resp_") and r.output_text == text
    assert r.usage.output_tokens == count and r.usage.input_tokens > 0
    assert r.status == ("incomplete" if count == 12 else "completed")
    kinds, deltas, final = [], [], None
    for event in client.responses.create(
            model=server.model_id, instructions="Be brief.", max_output_tokens=12, stream=True,
            input=[{"role": "user", "content": [{"type": "input_text",
                                                 "text": "Name a colour."}]}]):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created" and "response.output_text.done" in kinds
    assert "".join(deltas) == text and final.output_text == text
    assert final.usage.output_tokens == count


def test_a_function_call_and_its_output_round_trip(server, client):
    r = client.responses.create(model=server.model_id, input="Weather in Oslo?",
                                tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=80,
                                temperature=0.7, extra_body={"seed": 1})
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    stream = client.responses.create(
        model=server.model_id, input="Weather in Oslo?", tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80,
        temperature=0.7, extra_body={"seed": 2})
    done = [e for e in stream if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1
    jsonschema.validate(json.loads(done[0].arguments), WEATHER["parameters"])
    follow = [{"role": "user", "content": "Weather in Oslo?"},
              {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
               "arguments": calls[0].arguments},
              {"type": "function_call_output", "call_id": calls[0].call_id,
               "output": '{"celsius": 3}'}]
    r2 = client.responses.create(model=server.model_id, input=follow, tools=[WEATHER],
                                 max_output_tokens=6)
    assert r2.usage.output_tokens >= 1


def test_bad_requests_name_the_responses_fields(server, client):
    cases = [({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
             ({"input": ""}, "input"),
             ({"input": [{"type": "image"}]}, "input[0].type"),
             ({"input": "hi", "temperature": -1}, "temperature")]
    for body, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/responses", cast_to=object,
                        body={"model": server.model_id, **body})
        assert e.value.body["param"] == field, (field, e.value.body)
        assert e.value.body["message"].count(field) == 1, e.value.body


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    engine = server.coordinator.engine
    stream = client.responses.create(model=server.model_id, input="Go on.",
                                     max_output_tokens=400, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    assert engine.scheduler.running == 1
    stream.close()
    deadline = time.monotonic() + 30
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.running == 0
