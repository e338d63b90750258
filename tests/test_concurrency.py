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
        async with Serving(path, workers, max_sequences=16) as s:
            out = await asyncio.gather(*(s.generate(p, n) for p, n in requests))
            batcher = s.coordinator.engine.batcher
            return out, batcher.batches, batcher.batched_steps

    results, batches, steps = run(scenario())
    assert steps > 1.5 * batches, "decode steps were not grouped into microbatches"
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


def test_full_queue_is_refused_with_resource_exhausted(model_dir, workers):
    import grpc

    path = model_dir(SPEC)

    async def scenario():
        async with Serving(path, workers[:2], max_sequences=1, max_waiting=1) as s:
            first = asyncio.create_task(s.generate([20, 21, 22], 400))
            await asyncio.sleep(0.2)  # running
            second = asyncio.create_task(s.generate([23, 24, 25], 10))
            await asyncio.sleep(0.1)  # waiting
            waiting = s.coordinator.engine.scheduler.waiting
            try:
                await s.generate([26, 27], 5)
                third = "OK"
            except grpc.aio.AioRpcError as e:
                third = (e.code(), e.details())
            a, b = await first, await second
            return waiting, third, a[0], b[0]

    waiting, third, a, b = run(scenario())
    assert waiting == 1
    assert third[0].name == "RESOURCE_EXHAUSTED" and "retry later" in third[1]
    assert a == reference_tokens(model_dir(SPEC), [20, 21, 22], 400)
    assert b == reference_tokens(model_dir(SPEC), [23, 24, 25], 10)


def test_scheduler_is_fifo_and_a_cancelled_waiter_leaves_the_queue():
    from coordinator.scheduler import QueueFull, Scheduler

    async def scenario():
        s = Scheduler(max_running=1, max_waiting=2)
        order = []

        async def job(name: str, hold: float):
            async with s.slot():
                order.append(name)
                await asyncio.sleep(hold)

        a = asyncio.create_task(job("a", 0.05))
        await asyncio.sleep(0)
        b = asyncio.create_task(job("b", 0))
        c = asyncio.create_task(job("c", 0))
        await asyncio.sleep(0.01)
        full = None
        try:
            async with s.slot():
                pass
        except QueueFull as e:
            full = str(e)
        b.cancel()
        await asyncio.gather(a, c, return_exceptions=True)
        return order, full, s.running, s.waiting

    order, full, running, waiting = run(scenario())
    assert order == ["a", "c"] and "full" in full and (running, waiting) == (0, 0)


def test_request_past_its_deadline_is_stopped_and_frees_kv(model_dir, workers):
    import grpc

    path = model_dir(SPEC)

    async def scenario():
        async with Serving(path, workers) as s:
            req = inference_pb2.GenerateRequest(
                prompt_token_ids=list(range(20, 60)),
                sampling=inference_pb2.SamplingParams(max_tokens=1500))
            code = None
            try:
                async for _ in s.stub.Generate(req, timeout=0.5):
                    pass
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            for _ in range(100):
                infos = [await w.stub.Info(worker_pb2.InfoRequest())
                         for w in s.coordinator.cluster.workers]
                if all(i.sessions == 0 for i in infos):
                    break
                await asyncio.sleep(0.05)
            return code, [i.sessions for i in infos], s.coordinator.engine.scheduler.running

    code, sessions, running = run(scenario())
    assert code == "DEADLINE_EXCEEDED"
    assert sessions == [0, 0, 0] and running == 0


def test_full_queue_over_http_is_429_in_openai_shape(model_dir, workers):
    import json
    import urllib.error
    import urllib.request

    path = model_dir(SPEC)

    def post(url: str) -> tuple[int, dict]:
        req = urllib.request.Request(url, data=json.dumps({"prompt": "hello", "max_tokens": 4})
                                     .encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    async def scenario():
        async with Serving(path, workers[:2], max_sequences=1, max_waiting=0) as s:
            busy = asyncio.create_task(s.generate([20, 21, 22], 400))
            await asyncio.sleep(0.2)
            url = f"http://127.0.0.1:{s.coordinator.http_port}/v1/completions"
            result = await asyncio.to_thread(post, url)
            await busy
            return result

    status, body = run(scenario())
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error" and "retry later" in body["error"]["message"]
