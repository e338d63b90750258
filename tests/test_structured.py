"""Structured output and tool calls (docs/structured.md): random-weight models, which emit junk
unconstrained, always produce output that parses and validates; free requests beside them stay
token-exact against mlx-lm."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import llguidance
import openai
import pytest
from conftest import Serving, reference_tokens, run
from serving_thread import ServingThread

from coordinator.api.structured import grammar_of
from coordinator.api.tools import Tools
from coordinator.demo import ModelSpec
from protos import inference_pb2

SPEC = ModelSpec(family="llama")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "home": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                 "properties": {"city": {"type": "string", "maxLength": 10},
                                "zip": {"type": "integer", "minimum": 0, "maximum": 99999}}},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["positive", "negative", "neutral"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


@functools.lru_cache(maxsize=2)
def _tokenizer(path):
    return llguidance.LLTokenizer((path / "tokenizer.json").read_text(),
                                  n_vocab=json.loads((path / "config.json").read_text())[
                                      "vocab_size"])


def valid_prefix(path, params: inference_pb2.SamplingParams, token_ids: list[int]) -> bool:
    """Whether `token_ids` is a prefix the grammar of `params` allows (an output cut by
    max_tokens)."""
    matcher = llguidance.LLMatcher(_tokenizer(path), grammar_of(params), log_level=0)
    return matcher.consume_tokens(token_ids) and not matcher.is_error()


@pytest.fixture(scope="module", params=[1, 3], ids=["1worker", "3workers"])
def server(request, model_dir, workers):
    path = model_dir(SPEC)
    with ServingThread(path, workers[: request.param], max_sequences=8) as s:
        s.path = path
        s.model_id = s.coordinator.model.model_id
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _complete(client, server, i: int, stream: bool, **extra):
    """(text, finish_reason) of one completion with a different seed each time."""
    kwargs = dict(model=server.model_id, prompt=f"Record number {i}:", max_tokens=160,
                  temperature=1.0, seed=i, **extra)
    if not stream:
        r = client.completions.create(**kwargs)
        return r.choices[0].text, r.choices[0].finish_reason
    text, finish = "", None
    for event in client.completions.create(stream=True, **kwargs):
        if event.choices:
            text += event.choices[0].text
            finish = event.choices[0].finish_reason or finish
    return text, finish


def test_json_schema_outputs_always_validate(server, client):
    """Many sampled requests under a nested schema through the openai client, streamed and
    not: each stopped output parses and validates; an output cut by max_tokens is a prefix
    the grammar allows."""
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA,
                                                   "strict": True}}
    params = inference_pb2.SamplingParams(json_schema=json.dumps(SCHEMA))
    tok = server.coordinator.engine.tokenizer
    n = 50

    def one(i):
        return _complete(client, server, i, stream=i % 2 == 1,
                         extra_body={"response_format": fmt})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(n)))
    stopped = 0
    for text, finish in results:
        if finish == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
            stopped += 1
        else:
            assert finish == "length"
            assert valid_prefix(server.path, params, tok.encode(text, add_special_tokens=False))
    assert stopped >= n * 0.8, results  # the schema bounds every field: most runs finish


def test_json_object_regex_and_choice_always_match(server, client):
    for i in range(6):
        text, finish = _complete(client, server, i, stream=i % 2 == 0,
                                 extra_body={"guided_regex": REGEX})
        assert finish == "stop" and re.fullmatch(REGEX, text), text
        text, finish = _complete(client, server, i, stream=i % 2 == 1,
                                 extra_body={"guided_choice": CHOICES})
        assert finish == "stop" and text in CHOICES, text
    r = client.chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": "A JSON object, please"}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0.8, seed=3)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    text, finish = _complete(client, server, 1, stream=False,
                             extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no"'}})
    assert finish == "stop" and text in ("yes", "no")


def test_half_constrained_half_free_share_batches_and_free_ones_stay_exact(server):
    """8 concurrent gRPC requests: the constrained ones match their regex, the free ones are
    token-for-token what mlx-lm alone produces."""
    tok = server.coordinator.engine.tokenizer
    prompts = [tok.encode(f"Story {i}: the fox and the dog went") for i in range(8)]
    want = {i: reference_tokens(server.path, prompts[i], 24) for i in range(0, 8, 2)}

    async def all_of():
        channel = grpc.aio.insecure_channel(server.grpc_address)
        from protos import inference_pb2_grpc

        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(i):
            sampling = inference_pb2.SamplingParams(max_tokens=24)
            if i % 2:
                sampling.regex = REGEX
            tokens, text = [], ""
            async for msg in stub.Generate(inference_pb2.GenerateRequest(
                    prompt_token_ids=prompts[i], sampling=sampling)):
                tokens += list(msg.token_ids)
                text += msg.text
            return tokens, text

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await channel.close()

    got = server.call(all_of())
    for i, (tokens, text) in enumerate(got):
        if i % 2:
            assert re.fullmatch(REGEX, text), text
        else:
            assert tokens == want[i], i


def test_a_broken_schema_is_refused_before_any_work(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format" and "nonsense" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model_id, prompt="hi",
                                  extra_body={"guided_regex": "a(b"})
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model_id, prompt="hi",
                                  extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert e.value.body["param"] == "guided_choice"

    async def grpc_refusal():
        from protos import inference_pb2_grpc

        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(inference_pb2.GenerateRequest(
                        prompt="hi", sampling=inference_pb2.SamplingParams(json_schema="{oops"))):
                    pass
            return err.value

    err = server.call(grpc_refusal())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.json_schema" in err.details()


def _arguments_valid(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def _streamed_calls(client, server, messages, tool_choice) -> dict[int, dict]:
    """The tool calls of a streamed answer, put together from their deltas as clients do."""
    stream = client.chat.completions.create(model=server.model_id, messages=messages,
                                            tools=[WEATHER, TIME], tool_choice=tool_choice,
                                            parallel_tool_calls=False, max_tokens=200,
                                            temperature=0.7, seed=2, stream=True)
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for event in stream:
        delta = event.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = event.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls, (finish, content)
    assert all(c["id"].startswith("call_") for c in calls.values())
    return calls


def test_tool_calls_round_trip_through_the_openai_client(server, client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=server.model_id, messages=messages,
                                       tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=120, temperature=0.7, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _arguments_valid(call, WEATHER if call.function.name == "get_weather" else TIME)

    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        calls = _streamed_calls(client, server, messages, tool_choice)
        if tool_choice == named:
            assert list(calls) == [0] and calls[0]["name"] == "get_weather"
        for call in calls.values():
            tool = WEATHER if call["name"] == "get_weather" else TIME
            jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])

    # the follow-up: the assistant's call and the tool's answer go back through the template
    call = choice.message.tool_calls[0]
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = client.chat.completions.create(model=server.model_id, messages=follow,
                                        tools=[WEATHER, TIME], max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_errors_name_their_field(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert e.value.body["param"] == "tools[0].function.name"


def test_auto_reads_the_models_own_tool_call_format(model_dir):
    """With tool_choice auto the model's format (here Hermes-style <tool_call> JSON, which
    mlx-lm's json_tools parser reads) becomes message.tool_calls; other text stays content."""
    from coordinator.app import load_tokenizer

    tok = load_tokenizer(model_dir(SPEC))
    assert tok.has_tool_calling
    tools = Tools([WEATHER], parser=tok.tool_parser,
                  markers=(tok.tool_call_start, tok.tool_call_end))
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"unit": "celsius"}}\n</tool_call>')
    message, finish = tools.message(text, "stop")
    assert finish == "tool_calls" and message["content"] == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert tools.message("just words", "stop") == (
        {"role": "assistant", "content": "just words"}, "stop")


def test_speculative_decoding_respects_the_grammar(model_dir, workers):
    """Prompt-lookup proposals are checked under the grammar: some are proposed and accepted,
    and the output is the same as without speculation, and it matches."""
    from coordinator.app import load_tokenizer

    path = model_dir(SPEC)
    pattern = r"(ab|cd| ){4,40}\."
    prompt = load_tokenizer(path).encode("ab cd ab cd ab cd ab cd ab cd ab cd")

    async def scenario(**options):
        async with Serving(path, workers[:1], context=256, **options) as s:
            tokens, text, usage = [], "", None
            async for msg in s.stub.Generate(inference_pb2.GenerateRequest(
                    prompt_token_ids=prompt, sampling=inference_pb2.SamplingParams(
                        max_tokens=40, regex=pattern))):
                tokens += list(msg.token_ids)
                text += msg.text
                usage = msg.usage if msg.HasField("usage") else usage
            return tokens, text, usage

    plain = run(scenario())
    spec = run(scenario(speculative="ngram"))
    assert plain[:2] == spec[:2]
    assert spec[2].draft_tokens > 0 and spec[2].accepted_draft_tokens > 0, spec[2]
    assert re.fullmatch(pattern, plain[1]) or len(plain[0]) == 40, plain[1]


def test_the_python_client_passes_structured_output_through(server):
    from coordinator.client import Client, InvalidRequest

    with Client(server.grpc_address) as c:
        assert c.generate("Mood:", choice=CHOICES, max_tokens=20).text in CHOICES
        got = c.generate("Record:", json_schema=WEATHER["function"]["parameters"],
                         max_tokens=80, temperature=0.5, seed=4)
        if got.finish_reason == "stop":
            jsonschema.validate(json.loads(got.text), WEATHER["function"]["parameters"])
        with pytest.raises(InvalidRequest, match="sampling.regex"):
            c.generate("x", regex="(unclosed")
