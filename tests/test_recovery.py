"""A worker killed mid-generation: the coordinator re-plans over the live ones and every running
request continues where it was, token for token what single-process mlx-lm gives."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import GiB, Serving, reference_tokens, run

import protos
from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import inference_pb2

SPEC = ModelSpec(family="llama")
PROMPTS = [[1, 5, 9, 200, 33, 4, 77, 12], [3, 141, 59, 26, 5, 35], list(range(20, 60))]
MAX_TOKENS = 120


async def stream(s: Serving, prompt: list[int], max_tokens: int, got: list[int],
                 **sampling) -> int:
    """Generate, appending each token to `got` as it arrives; returns the finish reason."""
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                        SamplingParams(max_tokens=max_tokens, **sampling))
    finish = 0
    async for msg in s.stub.Generate(req):
        got += list(msg.token_ids)
        finish = msg.finish_reason or finish
    return finish


async def kill_when_streaming(local: LocalWorkers, index: int, got: list[list[int]],
                              at: int = 4) -> None:
    """SIGKILL worker `index` (no goodbye, no grace) once every request has `at` tokens."""
    while min(map(len, got)) < at:
        await asyncio.sleep(0.002)
    local.procs[index].kill()


def test_running_requests_survive_a_killed_worker(model_dir, cache_dir):
    path = model_dir(SPEC)
    expected = [reference_tokens(path, p, MAX_TOKENS) for p in PROMPTS]
    seeded = dict(temperature=0.9, top_p=0.95, seed=7)
    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache_dir,
                         names=["r1", "r2", "r3"])
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses, context=256) as s:
            sampled_alone: list[int] = []
            await stream(s, PROMPTS[0], MAX_TOKENS, sampled_alone, **seeded)
            got: list[list[int]] = [[] for _ in range(len(PROMPTS) + 1)]
            tasks = [asyncio.create_task(stream(s, p, MAX_TOKENS, got[i]))
                     for i, p in enumerate(PROMPTS)]
            tasks.append(asyncio.create_task(
                stream(s, PROMPTS[0], MAX_TOKENS, got[-1], **seeded)))
            await kill_when_streaming(local, 1, got)
            lengths_at_kill = [len(g) for g in got]
            finishes = await asyncio.gather(*tasks)
            state = s.coordinator.cluster.state()
            after: list[int] = []
            await stream(s, PROMPTS[1], MAX_TOKENS, after)
            return (got, finishes, lengths_at_kill, sampled_alone, after, state,
                    s.coordinator.membership.replans, s.coordinator.engine.resumed,
                    s.coordinator.metrics)

    try:
        got, finishes, at_kill, sampled_alone, after, state, replans, resumed, metrics = \
            run(scenario())
    finally:
        local.stop()
    assert all(n < MAX_TOKENS for n in at_kill), at_kill  # killed mid-generation
    for tokens, want in zip(got, expected, strict=False):
        assert tokens == want  # no gap, no duplicate, the same tokens
    # a seeded request (temperature > 0) killed mid-way gives the tokens, so the text, of the
    # same request run alone without a fault; sampling really decided them (not greedy)
    assert got[-1] == sampled_alone and sampled_alone != expected[0]
    assert at_kill[-1] < len(sampled_alone)  # killed mid-way through the seeded request too
    assert after == expected[1]
    assert set(finishes) <= {inference_pb2.FINISH_REASON_LENGTH, inference_pb2.FINISH_REASON_STOP}
    assert replans == 1 and resumed == len(got)
    rows = {w.name: w.status for w in state.workers}
    assert rows == {"r1": "serving", "r3": "serving", "r2": "unreachable"}, rows
    serving = [w for w in state.workers if w.status == "serving"]
    assert [(w.layer_start, w.layer_end) for w in serving][0][0] == 0
    assert serving[-1].layer_end == SPEC.num_layers
    assert metrics.replans.labels("worker_lost")._value.get() == 1


def test_a_loss_the_rest_cannot_hold_fails_the_requests_with_the_numbers(model_dir, cache_dir):
    path = model_dir(SPEC)
    local = LocalWorkers(3, memory=[600_000] * 3, cache_dir=cache_dir, names=["s1", "s2", "s3"])
    addresses = local.start()

    async def scenario():
        # no prefix cache: its KV (reserved by the plan) would not fit even 3 of these workers
        async with Serving(path, addresses, context=256, prefix_cache_tokens=0) as s:
            got: list[list[int]] = [[]]
            task = asyncio.create_task(stream(s, PROMPTS[0], MAX_TOKENS, got[0]))
            await kill_when_streaming(local, 2, got)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await task
            try:
                await stream(s, PROMPTS[1], 4, [])
            except grpc.aio.AioRpcError as e:
                later = e
            return err.value, later, s.coordinator.membership.replans

    try:
        error, later, replans = run(scenario())
    finally:
        local.stop()
    for e in (error, later):
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot hold the model" in e.details() and "needs 1.30 MiB" in e.details(), \
            e.details()
    assert replans == 0


def test_recover_timeout_zero_fails_running_requests_but_the_cluster_still_recovers(
        model_dir, cache_dir):
    path = model_dir(SPEC)
    expected = reference_tokens(path, PROMPTS[1], 16)
    local = LocalWorkers(2, memory=[1 * GiB, 1 * GiB], cache_dir=cache_dir, names=["z1", "z2"])
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses, context=256, recover_timeout=0) as s:
            got: list[list[int]] = [[]]
            task = asyncio.create_task(stream(s, PROMPTS[0], MAX_TOKENS, got[0]))
            await kill_when_streaming(local, 1, got)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await task
            for _ in range(200):  # the re-plan over z1 goes on without the request
                if s.coordinator.membership.replans:
                    break
                await asyncio.sleep(0.05)
            later: list[int] = []
            await stream(s, PROMPTS[1], 16, later)
            return err.value, later, s.coordinator.engine.resumed

    try:
        error, later, resumed = run(scenario())
    finally:
        local.stop()
    assert error.code() == grpc.StatusCode.UNAVAILABLE and resumed == 0
    assert later == expected  # served by z1 alone after the re-plan


def test_a_goodbye_after_a_failed_load_makes_the_worker_left():
    """A stopping worker answered a health check during its grace, a re-plan took it, and its
    load failed as it stopped: its goodbye says why, so it shows as left (not excluded)."""
    from coordinator.cluster.cluster import Worker
    from coordinator.cluster.discovery import LOAD_FAILED, MemberTable
    from protos import worker_pb2
    from protos.discovery import WorkerAd

    table = MemberTable("lab")
    member, _ = table.saw("w2._shardline._tcp.local.", WorkerAd(id="n2", cluster="lab"),
                          ["10.0.0.2"], 50061)
    table.identified(member, Worker("10.0.0.2:50061", worker_pb2.WorkerInfo(
        id="n2", name="w2", cluster="lab", api=protos.WIRE_VERSION, memory_bytes=1 << 30),
        channel=None))
    member.reason = LOAD_FAILED
    assert member.status() == f"excluded: {LOAD_FAILED}"
    table.left(member.key)
    assert member.status() == "left"
