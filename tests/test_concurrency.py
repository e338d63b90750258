"""Concurrent requests do not disturb each other; a cancelled request frees KV on every stage."""

from __future__ import annotations

import asyncio

from conftest import Serving, reference_tokens, run

from coordinator.demo import ModelSpec
from protos import inference_pb2, worker_pb2

SPEC = ModelSpec(family="qwen3")


def test_sixteen_concurrent_requests_each_match_mlx_lm_alone(model_dir, workers):
    path = model_dir(SPEC)
    requests = [([(13 * i + 5 * j) % 480 + 10 for j in range(3 + 5 * i)], 4 + (i * 7) % 25)
                for i in range(16)]
    expected = [reference_tokens(path, p, n) for p, n in requests]

    async def scenario():
        async with Serving(path, workers) as s:
            return await asyncio.gather(*(s.generate(p, n) for p, n in requests))

    results = run(scenario())
    for i, ((tokens, _, _), want) in enumerate(zip(results, expected, strict=True)):
        assert tokens == want, f"request {i} (prompt {len(requests[i][0])} tokens) diverged"


def test_cancelled_request_frees_its_kv_on_every_stage(model_dir, workers):
    path = model_dir(SPEC)

    async def sessions(s: Serving) -> list[int]:
        out = []
        for w in s.coordinator.cluster.workers:
            out.append((await w.stub.Info(worker_pb2.InfoRequest())).sessions)
        return out

    async def scenario():
        async with Serving(path, workers) as s:
            req = inference_pb2.GenerateRequest(
                prompt_token_ids=list(range(20, 60)),
                sampling=inference_pb2.SamplingParams(max_tokens=1000))
            call = s.stub.Generate(req)
            got = 0
            async for msg in call:
                got += len(msg.token_ids)
                if got >= 5:
                    break
            during = await sessions(s)
            call.cancel()
            for _ in range(100):
                after = await sessions(s)
                if after == [0, 0, 0]:
                    break
                await asyncio.sleep(0.05)
            tokens, _, _ = await s.generate([20, 30, 40], 3)
            return during, after, tokens

    during, after, tokens = run(scenario())
    assert during == [1, 1, 1]
    assert after == [0, 0, 0]
    assert len(tokens) == 3
