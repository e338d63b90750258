"""A worker paused (SIGSTOP) mid-generation: past the failure timeout the running requests resume
on a re-plan without it, token for token, and its waking up (SIGCONT) disturbs no one; a pause
shorter than the timeout only delays them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from conftest import GiB, Serving, reference_tokens, run, until
from test_recovery import stream

from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import inference_pb2

SPEC = ModelSpec(family="llama")
PROMPTS = [[1, 5, 9, 200, 33, 4, 77, 12], [3, 141, 59, 26, 5, 35]]
MAX_TOKENS = 120
# two greedy and two seeded requests (temperature > 0: the seed alone decides the tokens)
SAMPLINGS = [{}, {}, dict(temperature=0.9, top_p=0.95, seed=7),
             dict(temperature=0.8, top_k=40, seed=11)]
REQUESTS = [(PROMPTS[i % 2], sampling) for i, sampling in enumerate(SAMPLINGS)]
LONG_PAUSE = 20.0  # seconds: well past the failure timeout (two missed 2 s health checks) and
# the gRPC keepalive (10 s + 5 s, protos/__init__.py), so the paused worker's streams break too
SHORT_PAUSE = 1.0  # seconds: less than one health check's timeout


def start_workers(cache_dir, prefix: str) -> LocalWorkers:
    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache_dir,
                         names=[f"{prefix}1", f"{prefix}2", f"{prefix}3"])
    local.start()
    return local


def stop_workers(local: LocalWorkers) -> None:
    for proc in local.procs:  # a stopped worker would not hear SIGTERM
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
    local.stop()


async def references(s: Serving, path) -> list[list[int]]:
    """The fault-free tokens of every request: mlx-lm's for greedy, a lone run for seeded."""
    out = []
    for prompt, sampling in REQUESTS:
        if sampling:
            alone: list[int] = []
            await stream(s, prompt, MAX_TOKENS, alone, **sampling)
            out.append(alone)
        else:
            out.append(reference_tokens(path, prompt, MAX_TOKENS))
    return out


def start_all(s: Serving) -> tuple[list[asyncio.Task], list[list[int]]]:
    got: list[list[int]] = [[] for _ in REQUESTS]
    tasks = [asyncio.create_task(stream(s, prompt, MAX_TOKENS, got[i], **sampling))
             for i, (prompt, sampling) in enumerate(REQUESTS)]
    return tasks, got


async def streaming(got: list[list[int]], tasks: list[asyncio.Task], at: int = 4) -> None:
    """Wait until every request has `at` tokens or has finished (a failed one raises here)."""
    while any(len(g) < at and not t.done() for g, t in zip(got, tasks, strict=True)):
        await asyncio.sleep(0.002)
    for task in tasks:
        if task.done():
            task.result()


def test_a_paused_worker_is_replanned_around_and_its_wakeup_disturbs_no_one(
        model_dir, cache_dir):
    path = model_dir(SPEC)
    local = start_workers(cache_dir, "q")
    middle = local.procs[1].pid

    async def scenario():
        async with Serving(path, local.addresses, context=256) as s:
            expected = await references(s, path)
            tasks, got = start_all(s)
            await streaming(got, tasks)
            os.kill(middle, signal.SIGSTOP)
            paused = time.monotonic()
            at_pause = [len(g) for g in got]
            finishes = await asyncio.gather(*tasks)  # while it is still stopped
            recovered = time.monotonic() - paused
            replans = s.coordinator.membership.replans
            rows = {w.name: w.status for w in s.coordinator.cluster.state().workers}
            # still stopped, past the keepalives: a second round on the re-planned pipeline,
            # and the worker wakes up while it streams
            await asyncio.sleep(max(0.0, LONG_PAUSE - (time.monotonic() - paused)))
            tasks, during_wake = start_all(s)
            await streaming(during_wake, tasks)
            os.kill(middle, signal.SIGCONT)
            finishes += await asyncio.gather(*tasks)
            # it may rejoin by the rebalance policy (a re-plan while nothing runs): let it
            membership = s.coordinator.membership
            await until(lambda: membership.replans > replans and not membership._replanning,
                        timeout=15)
            after: list[list[int]] = []
            for prompt, sampling in REQUESTS:
                after.append([])
                await stream(s, prompt, MAX_TOKENS, after[-1], **sampling)
            return (expected, got, during_wake, after, at_pause, recovered, finishes, replans,
                    rows, s.coordinator.engine.resumed)

    try:
        (expected, got, during_wake, after, at_pause, recovered, finishes, replans, rows,
         resumed) = run(scenario())
    finally:
        stop_workers(local)
    # paused mid-generation of every request
    assert all(n < len(e) for n, e in zip(at_pause, expected, strict=True)), at_pause
    assert got == expected  # no gap, no duplicate, the same tokens, greedy and seeded
    assert during_wake == expected
    assert after == expected
    assert recovered < LONG_PAUSE, recovered  # detected within seconds, not on waking
    assert replans == 1 and resumed == len(REQUESTS)
    assert rows == {"q1": "serving", "q3": "serving", "q2": "unreachable"}, rows
    assert set(finishes) <= {inference_pb2.FINISH_REASON_LENGTH,
                             inference_pb2.FINISH_REASON_STOP}


def test_a_pause_shorter_than_the_timeout_only_delays_the_requests(model_dir, cache_dir):
    path = model_dir(SPEC)
    local = start_workers(cache_dir, "b")
    middle = local.procs[1].pid

    async def scenario():
        async with Serving(path, local.addresses, context=256) as s:
            expected = await references(s, path)
            tasks, got = start_all(s)
            await streaming(got, tasks)
            os.kill(middle, signal.SIGSTOP)
            at_pause = [len(g) for g in got]
            await asyncio.sleep(SHORT_PAUSE)
            os.kill(middle, signal.SIGCONT)
            await asyncio.gather(*tasks)
            rows = {w.name: w.status for w in s.coordinator.cluster.state().workers}
            return (expected, got, at_pause, rows, s.coordinator.membership.replans,
                    s.coordinator.engine.resumed)

    try:
        expected, got, at_pause, rows, replans, resumed = run(scenario())
    finally:
        stop_workers(local)
    assert all(n < len(e) for n, e in zip(at_pause, expected, strict=True)), at_pause
    assert got == expected
    assert replans == 0 and resumed == 0  # the requests just went on
    assert rows == {"b1": "serving", "b2": "serving", "b3": "serving"}, rows
