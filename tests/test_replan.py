"""Re-plans move only what changed (docs/weights.md): a worker joining mid-request gets only the
layers that move, the others keep what they hold in memory, the old pipeline serves while the new
shards load, and the requests running on it finish there, token for token, while new requests
start on the new plan."""

from __future__ import annotations

import asyncio

from conftest import GiB, Serving, reference_tokens, run

from coordinator.cluster.discovery import split_address
from coordinator.cluster.membership import dial
from coordinator.cluster.shipping import Shipper
from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import inference_pb2
from protos.discovery import WorkerAd

SPEC = ModelSpec(family="llama", num_layers=8)
PROMPTS = [[1, 5, 9, 200, 33, 4, 77, 12], [3, 141, 59, 26, 5, 35]]
MAX_TOKENS = 160


async def stream(s: Serving, prompt: list[int], got: list[int]) -> int:
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                        SamplingParams(max_tokens=MAX_TOKENS))
    finish = 0
    async for msg in s.stub.Generate(req):
        got += list(msg.token_ids)
        finish = msg.finish_reason or finish
    return finish


async def announce(s: Serving, address: str, name: str) -> None:
    """Tell membership about the worker at `address` as mDNS would."""
    joiner = await dial(address)
    node_id = joiner.info.id
    await joiner.channel.close()
    host, port = split_address(address)
    s.coordinator.membership._on_seen(f"{name}._shardline._tcp.local.",
                                      WorkerAd(id=node_id, cluster="default"), [host], port, "")


def test_a_join_moves_only_the_layers_that_change_while_requests_run(model_dir, tmp_path):
    path = model_dir(SPEC)
    expected = [reference_tokens(path, p, MAX_TOKENS) for p in PROMPTS]
    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=tmp_path,
                         names=["j1", "j2", "j3"])
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses[:2], context=256) as s:
            membership = s.coordinator.membership
            membership.settle = 0.05
            cluster = s.coordinator.cluster
            before = {w.info.name: (w.shard.spec.layer_start, w.shard.spec.layer_end)
                      for w in cluster.workers}
            got: list[list[int]] = [[] for _ in PROMPTS]
            tasks = [asyncio.create_task(stream(s, p, got[i])) for i, p in enumerate(PROMPTS)]
            while min(map(len, got)) < 4:
                await asyncio.sleep(0.002)
            await announce(s, addresses[2], "j3")
            while len(cluster.workers) < 3:  # the re-plan has begun: its shards load now
                await asyncio.sleep(0.001)
            at_start = sum(map(len, got))
            while membership.replans == 0:
                await asyncio.sleep(0.001)
            at_switch = [len(g) for g in got]
            during = sum(at_switch) - at_start
            late: list[int] = []
            late_finish = await stream(s, PROMPTS[0], late)
            finishes = await asyncio.gather(*tasks)
            after = {w.info.name: (w.shard.spec.layer_start, w.shard.spec.layer_end,
                                   w.transfer.total, w.layers_kept) for w in cluster.workers}
            shipper = Shipper(s.coordinator.model)
            files = {name: {f.sha256: f.size for f in await shipper.files(a, b)}
                     for name, (a, b, _, _) in after.items()}
            old_files = {name: {f.sha256 for f in await shipper.files(a, b)}
                         for name, (a, b) in before.items()}
            return (got, finishes, late, late_finish, at_switch, during, before, after, files,
                    old_files, s.coordinator.engine.resumed)

    try:
        (got, finishes, late, late_finish, at_switch, during, before, after, files,
         old_files, resumed) = run(scenario())
    finally:
        local.stop()
    assert got == expected and late == expected[0]
    assert set(finishes) | {late_finish} == {inference_pb2.FINISH_REASON_LENGTH}
    # the requests running at the switch finished on the old plan (draining), not resumed
    assert max(at_switch) < MAX_TOKENS and resumed == 0
    assert during > 0, "the old pipeline served no token while the new shards loaded"
    assert set(after) == {"j1", "j2", "j3"}
    assert any(before[n] != after[n][:2] for n in before)  # layers moved between them
    for name, (start, end, sent, kept) in after.items():
        old = old_files.get(name, set())
        moved = sum(size for sha, size in files[name].items() if sha not in old)
        assert sent == moved, (name, sent, moved)  # only the files of layers it lacked
        if name in before:
            a, b = before[name]
            assert kept == max(0, min(b, end) - max(a, start)), (name, kept)
        else:
            assert kept == 0


def test_a_second_replan_while_the_first_drains_loses_no_request(model_dir, tmp_path):
    """Two joins in a row: the requests still finishing on the plan the first replaced (its
    shards a worker gives up at the second load) stop and resume on the new plan, exactly,
    instead of failing on a replaced shard."""
    path = model_dir(SPEC)
    expected = [reference_tokens(path, p, MAX_TOKENS) for p in PROMPTS]
    local = LocalWorkers(4, memory=[1 * GiB] * 4, cache_dir=tmp_path,
                         names=["d1", "d2", "d3", "d4"])
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses[:2], context=256) as s:
            membership = s.coordinator.membership
            membership.settle = 0.05
            got: list[list[int]] = [[] for _ in PROMPTS]
            tasks = [asyncio.create_task(stream(s, p, got[i])) for i, p in enumerate(PROMPTS)]
            while min(map(len, got)) < 4:
                await asyncio.sleep(0.002)
            await announce(s, addresses[2], "d3")
            while membership.replans == 0:  # switched: the requests drain on the first plan
                await asyncio.sleep(0.001)
            at_second = [len(g) for g in got]
            await announce(s, addresses[3], "d4")
            finishes = await asyncio.gather(*tasks)
            return got, finishes, at_second, membership.replans, s.coordinator.engine.resumed

    try:
        got, finishes, at_second, replans, resumed = run(scenario())
    finally:
        local.stop()
    assert max(at_second) < MAX_TOKENS, at_second  # still running when the second began
    assert got == expected
    assert set(finishes) == {inference_pb2.FINISH_REASON_LENGTH}
    assert replans == 2 and resumed == len(PROMPTS)
