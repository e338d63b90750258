"""Concurrent requests do not disturb each other; a cancelled request frees KV on every stage."""

from __future__ import annotations

import asyncio
import time
from functools import cache

import pytest
from conftest import Serving, reference_tokens, run, until

from coordinator.demo import ModelSpec
from protos import inference_pb2, worker_pb2

SPEC = ModelSpec(family="qwen3")


@cache
def expected(path, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """mlx-lm's tokens for this request alone (each reference loads the model: kept)."""
    return reference_tokens(path, list(prompt), max_tokens)


def watch_in_flight(s: Serving) -> list[int]:
    """Record the steps in flight on the pipeline after every send (its peak is the last)."""
    pipeline = s.coordinator.cluster.pipeline
    send, peak = pipeline.send, [0]

    def counting_send(seqs, release=None):
        future = send(seqs, release)
        peak[0] = max(peak[0], len(pipeline._pending))
        return future

    pipeline.send = counting_send
    return peak


@pytest.mark.parametrize("chunk", [512, 7])
def test_sixteen_concurrent_requests_each_match_mlx_lm_alone(model_dir, workers, chunk):
    path = model_dir(SPEC)
    requests = [([(13 * i + 5 * j) % 480 + 10 for j in range(3 + 5 * i)], 4 + (i * 7) % 25)
                for i in range(16)]
    want = [expected(path, tuple(p), n) for p, n in requests]

    async def scenario():
        async with Serving(path, workers, max_sequences=16, prefill_chunk=chunk) as s:
            peak = watch_in_flight(s)
            out = await asyncio.gather(*(s.generate(p, n) for p, n in requests))
            return out, s.coordinator.engine.batcher, peak[0]

    results, batcher, peak = run(scenario())
    assert batcher.batched_steps > 1.5 * batcher.batches, "decode steps were not grouped"
    # decode groups and prefill chunks share one cap: the 3 stages overlap, never more
    assert 1 < batcher.max_in_flight <= 3 and 1 < peak <= 3, (batcher.max_in_flight, peak)
    # with chunk 7 the prompts (up to 78 tokens) really go in many chunks
    chunks = sum(-(-(len(p) - 1) // chunk) + 1 for p, _ in requests)
    assert batcher.prefill_chunks == chunks
    for i, ((tokens, _, _), w) in enumerate(zip(results, want, strict=True)):
        assert tokens == w, f"request {i} (prompt {len(requests[i][0])} tokens) diverged"


def test_long_prompt_prefills_in_chunks_while_running_streams_keep_decoding(model_dir,
                                                                            workers):
    path = model_dir(SPEC)
    streams = [([(17 * i + 3 * j) % 480 + 10 for j in range(6 + i)], 150) for i in range(4)]
    long = [(7 * j + 11) % 480 + 10 for j in range(300)]

    async def stream(s: Serving, prompt: list[int], n: int, times: list[float]) -> list[int]:
        req = inference_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=inference_pb2.SamplingParams(max_tokens=n))
        tokens = []
        async for msg in s.stub.Generate(req):
            if msg.token_ids:
                times.append(time.perf_counter())
            tokens += list(msg.token_ids)
        return tokens

    async def scenario():
        async with Serving(path, workers, max_sequences=8, prefill_chunk=16) as s:
            times: list[list[float]] = [[] for _ in streams]
            running = [asyncio.create_task(stream(s, p, n, t))
                       for (p, n), t in zip(streams, times, strict=True)]
            while min(len(t) for t in times) < 3:
                await asyncio.sleep(0.005)
            long_times: list[float] = []
            sent = time.perf_counter()
            long_tokens = await stream(s, long, 8, long_times)
            outs = await asyncio.gather(*running)
            during = [sum(sent < t < long_times[0] for t in ts) for ts in times]
            return outs, long_tokens, during, s.coordinator.engine.batcher

    outs, long_tokens, during, batcher = run(scenario())
    assert long_tokens == expected(path, tuple(long), 8)
    for i, ((p, n), tokens) in enumerate(zip(streams, outs, strict=True)):
        assert tokens == expected(path, tuple(p), n), f"stream {i} diverged"
    # 19 chunks of 16 and the last token: the running streams got tokens in between
    assert all(k >= 2 for k in during), during
    assert batcher.max_in_flight <= 3


def test_cancelled_request_frees_its_kv_on_every_stage(model_dir, workers):
    path = model_dir(SPEC)

    async def sessions(s: Serving) -> list[tuple[int, int]]:
        out = []
        for w in s.coordinator.cluster.workers:
            info = await w.stub.Info(worker_pb2.InfoRequest())
            out.append((info.sessions, info.kv_bytes))
        return out

    async def scenario():
        async with Serving(path, workers) as s:
            # a finished request stays in the prefix cache: the baseline holds its KV
            await s.generate(list(range(100, 130)), 4)
            baseline = await sessions(s)
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
                if after == baseline:
                    break
                await asyncio.sleep(0.05)
            tokens, _, _ = await s.generate([20, 30, 40], 3)
            return baseline, during, after, tokens

    baseline, during, after, tokens = run(scenario())
    assert [n for n, _ in baseline] == [1, 1, 1] and all(kv > 0 for _, kv in baseline)
    assert [n for n, _ in during] == [2, 2, 2]
    assert all(kv > base for (_, kv), (_, base) in zip(during, baseline, strict=True))
    assert after == baseline  # sessions and KV bytes back to what they were, on every stage
    assert len(tokens) == 3


def test_full_queue_is_refused_with_resource_exhausted(model_dir, workers):
    import grpc

    path = model_dir(SPEC)

    async def scenario():
        async with Serving(path, workers[:2], max_sequences=1, max_waiting=1) as s:
            scheduler = s.coordinator.engine.scheduler
            first = asyncio.create_task(s.generate([20, 21, 22], 400))
            assert await until(lambda: scheduler.running == 1)
            second = asyncio.create_task(s.generate([23, 24, 25], 10))
            assert await until(lambda: scheduler.waiting == 1)
            waiting = scheduler.waiting
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
    from coordinator.serving.scheduler import QueueFull, Scheduler

    async def scenario():
        s = Scheduler(max_running=1, max_waiting=2)
        order = []

        async def job(name: str, hold: float):
            async with s.slot():
                order.append(name)
                await asyncio.sleep(hold)

        a = asyncio.create_task(job("a", 0.05))
        assert await until(lambda: s.running == 1, every=0)
        b = asyncio.create_task(job("b", 0))
        c = asyncio.create_task(job("c", 0))
        assert await until(lambda: s.waiting == 2, every=0)
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

    def post(url: str) -> tuple[int, dict, str | None]:
        req = urllib.request.Request(url, data=json.dumps({"prompt": "hello", "max_tokens": 4})
                                     .encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read()), r.headers.get("Retry-After")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers.get("Retry-After")

    async def scenario():
        async with Serving(path, workers[:2], max_sequences=1, max_waiting=0) as s:
            busy = asyncio.create_task(s.generate([20, 21, 22], 400))
            assert await until(lambda: s.coordinator.engine.scheduler.running == 1)
            url = f"http://127.0.0.1:{s.coordinator.http_port}/v1/completions"
            result = await asyncio.to_thread(post, url)
            await busy
            return result

    status, body, retry = run(scenario())
    assert status == 429 and retry == "1"  # the client is told when to come back
    assert body["error"]["type"] == "rate_limit_error" and "retry later" in body["error"]["message"]


def test_a_prompt_that_tokenizes_slowly_does_not_stall_the_running_streams(model_dir, workers):
    """Tokenizing runs off the event loop: while one request's prompt is being tokenized (held
    here until the test lets it go), a running stream keeps receiving tokens."""
    import threading

    path = model_dir(SPEC)
    prompt = [(11 * j + 7) % 480 + 10 for j in range(20)]
    started, release = threading.Event(), threading.Event()
    released: list[bool] = []

    class SlowTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, text, **kwargs):
            if text.startswith("SLOW"):
                started.set()
                # on the event loop this would block it: the test could not release it
                released.append(release.wait(15))
            return self.inner.encode(text, **kwargs)

    async def scenario():
        async with Serving(path, workers, max_sequences=4) as s:
            engine = s.coordinator.engine
            engine.tokenizer = SlowTokenizer(engine.tokenizer)
            got: list[int] = []

            async def running():
                req = inference_pb2.GenerateRequest(
                    prompt_token_ids=prompt, sampling=inference_pb2.SamplingParams(
                        max_tokens=48))
                async for msg in s.stub.Generate(req):
                    got.extend(msg.token_ids)

            stream = asyncio.create_task(running())
            while not got:
                await asyncio.sleep(0.01)
            async def held():
                req = inference_pb2.GenerateRequest(
                    prompt="SLOW start", sampling=inference_pb2.SamplingParams(max_tokens=2))
                return [t async for msg in s.stub.Generate(req) for t in msg.token_ids]

            slow = asyncio.create_task(held())
            while not started.is_set():
                await asyncio.sleep(0.01)
            during = len(got)
            deadline = time.monotonic() + 20
            while len(got) < during + 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            grew = len(got) - during
            release.set()
            first = await slow
            await stream
            return grew, first, got

    grew, first, got = run(scenario())
    assert released == [True]  # the test ran while the prompt was held in the tokenizer
    assert grew >= 3  # and tokens kept coming meanwhile
    assert len(first) == 2  # and the held request then ran
    assert got == expected(path, tuple(prompt), 48)
