"""Speculative decoding with the rest of serving (docs/speculation.md): prompts prefilled in
small chunks, a follow-up turn that forks the prefix cache's KV of a request whose rejected
proposals were rolled back, logprobs, and a request whose gRPC deadline passes mid-stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import Serving, reference_tokens, run
from test_speculation import PROMPT, spec_for

from coordinator.demo import draft_model
from protos import inference_pb2


async def stream(s: Serving, prompt: list[int], max_tokens: int, timeout: float | None = None
                 ) -> tuple[list[int], list[float], inference_pb2.Usage | None]:
    """Tokens, their logprobs and the usage of one Generate call (logprobs asked for)."""
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                        SamplingParams(max_tokens=max_tokens, logprobs=0))
    tokens, logprobs, usage = [], [], None
    async for msg in s.stub.Generate(req, timeout=timeout):
        tokens += msg.token_ids
        logprobs += msg.logprobs
        if msg.HasField("usage"):
            usage = msg.usage
    return tokens, logprobs, usage


async def drained(s: Serving, timeout: float = 30.0) -> None:
    """Wait until the coordinator runs and queues no request (its metrics say)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    registry = s.coordinator.metrics.registry
    while registry.get_sample_value("shardline_requests_running") or \
            registry.get_sample_value("shardline_requests_waiting"):
        assert loop.time() < end, "a request was never freed"
        await asyncio.sleep(0.02)


def test_chunked_prefill_prefix_cache_logprobs_and_a_deadline_with_proposals(model_dir, workers):
    path = model_dir(spec_for("llama"))
    draft = draft_model(path, 3)
    follow_tail = [(5 * i + 3) % 480 + 10 for i in range(10)]

    async def scenario(**options):
        async with Serving(path, workers[:2], context=256, prefill_chunk=4, **options) as s:
            engine = s.coordinator.engine
            first = await stream(s, PROMPT, 16)
            follow = PROMPT + first[0] + follow_tail
            before, hits = engine.prefilled_tokens, engine.prefix.hits
            second = await stream(s, follow, 20)
            prefilled = engine.prefilled_tokens - before
            # a deadline that passes mid-stream (or before the first token): the request ends
            # with DEADLINE_EXCEEDED and frees its sequence, and the next one is exact
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stream(s, PROMPT[:7], 200, timeout=0.2)
            await drained(s)
            after = await stream(s, PROMPT[:7], 12)
            return (first, follow, second, prefilled, engine.prefix.hits - hits,
                    late.value.code(), after)

    plain = run(scenario())
    spec = run(scenario(draft_model=str(draft)))
    first, follow, second, prefilled, hits, late, after = spec
    assert first[0] == reference_tokens(path, PROMPT, 16)
    assert second[0] == reference_tokens(path, follow, 20)
    assert after[0] == reference_tokens(path, PROMPT[:7], 12)
    assert first[2].draft_tokens > 0 and second[2].accepted_draft_tokens > 0
    # the follow-up forked the KV of the first request (its rejected positions rolled back):
    # only the reply's last token and the new ones were prefilled, as without speculation
    assert hits == plain[4] == 1 and prefilled == plain[3] == 11
    assert late == plain[5] == grpc.StatusCode.DEADLINE_EXCEEDED
    for got, without in zip((first, second, after), (plain[0], plain[2], plain[6]), strict=True):
        assert got[0] == without[0] and len(got[1]) == len(got[0])
        assert got[1] == pytest.approx(without[1], abs=1e-4)  # each position's own logprob
