"""Workers that share a device: one decode microbatch of every running sequence, token-exact."""

from __future__ import annotations

import asyncio
import os

import pytest
from conftest import GiB, Serving, reference_tokens, run

from coordinator.cluster.cluster import lanes
from coordinator.demo import ModelSpec
from protos import worker_pb2


def info(device: str = "", lanes: int = 0) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(device=device, lanes=lanes)


def test_lanes_count_each_device_once_up_to_what_it_computes_at_once():
    assert lanes([info("gpu:a", 1)] * 4) == 1  # four workers on one GPU take turns
    assert lanes([info("gpu:a", 1), info("gpu:b", 1), info("gpu:b", 1)]) == 2
    assert lanes([info("cpu:a:0,1", 2)] * 3) == 2  # three workers on two cores
    assert lanes([info("cpu:a:0,1", 2)]) == 1  # one worker computes one step at a time
    assert lanes([info(), info(), info()]) == 3  # no device named: a machine each
    assert lanes([info("gpu:a", 0), info("gpu:a", 0)]) == 1  # no lanes reported: one
    assert lanes([]) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_workers_pinned_to_one_core_decode_all_streams_in_one_group(model_dir, cache_dir):
    from coordinator.local import LocalWorkers

    path = model_dir(ModelSpec(family="llama"))
    prompts = [[(11 * i + 3 * j) % 400 + 10 for j in range(5 + i)] for i in range(4)]
    local = LocalWorkers(3, memory=[2 * GiB] * 3, cpus=[0, 0, 0], cache_dir=cache_dir)
    addresses = local.start()

    said: list[str] = []

    async def scenario():
        serving = Serving(path, addresses, max_sequences=4)
        serving.coordinator.progress = said.append
        async with serving as s:
            cluster = s.coordinator.cluster
            devices = {w.info.device for w in cluster.workers}
            out = await asyncio.gather(*(s.generate(p, 12) for p in prompts))
            batcher = s.coordinator.engine.batcher
            return devices, cluster.lanes, out, batcher.batches, batcher.batched_steps

    try:
        devices, n, out, groups, steps = run(scenario())
    finally:
        local.stop()
    assert len(devices) == 1 and next(iter(devices)).startswith("cpu:") and n == 1
    assert any("decode in 1 microbatch" in m for m in said), said
    # 4 streams of 11 decode steps each: in groups of (nearly) all four, not one per stage
    assert steps == 44 and groups <= 14, (groups, steps)
    for p, (tokens, _, _) in zip(prompts, out, strict=True):
        assert tokens == reference_tokens(path, p, 12)
