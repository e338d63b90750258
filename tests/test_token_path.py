"""The token's path between workers: the last stage answers the coordinator on a Results stream
(protos/worker.proto), a stage's error travels on to it, and each stage overlaps its steps."""

from __future__ import annotations

import asyncio

import grpc
from conftest import counter_by, loaded_cluster, reference_tokens, run

from coordinator.cluster.cluster import Cluster
from coordinator.demo import ModelSpec
from coordinator.serving.pipeline import PLAN_METADATA_KEY
from protos import worker_pb2
from worker.mlx_thread import MLXThread
from worker.shard import load_shard
from worker.stage import StageRunner

SPEC = ModelSpec(family="llama")
PROMPT = [(7 * i + 3) % 480 + 10 for i in range(12)]


def first_step(seq_id: str) -> worker_pb2.StageMessage:
    return worker_pb2.StageMessage(step_id=1, seqs=[
        worker_pb2.SeqInput(seq_id=seq_id, token_ids=PROMPT, start=True, sample=True)])


async def loaded(path, addresses) -> Cluster:
    cluster = await loaded_cluster(path, addresses)
    assert len(cluster.plan.stages) == len(addresses)
    return cluster


async def sessions(cluster: Cluster) -> list[int]:
    return [(await w.stub.Info(worker_pb2.InfoRequest())).sessions for w in cluster.workers]


def test_the_last_stage_answers_on_the_results_stream_not_back_through_the_stages(
        model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        cluster = await loaded(path, workers)
        try:
            plan = ((PLAN_METADATA_KEY, cluster.plan_id),)
            results = cluster.workers[-1].stub.Results(
                worker_pb2.ResultsRequest(plan_id=cluster.plan_id))
            attached = await results.read()
            forward = cluster.workers[0].stub.Forward(metadata=plan)
            await forward.write(first_step("direct"))
            answer = await asyncio.wait_for(results.read(), 30)
            await forward.done_writing()
            back = [m async for m in forward]  # nothing came back through the stages
            results.cancel()
            return attached, answer, back
        finally:
            await cluster.close()

    attached, answer, back = run(scenario())
    assert attached == worker_pb2.StageResult()
    assert answer.step_id == 1 and not answer.error
    assert [o.token for o in answer.outputs] == reference_tokens(path, PROMPT, 1)
    assert back == []


def test_a_stage_error_travels_on_to_the_results_and_the_stream_serves_on(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        cluster = await loaded(path, workers)
        try:
            p = cluster.pipeline
            good = await p.send(first_step("ok").seqs)
            started = await sessions(cluster)
            # an unknown sequence fails on stage 0; its release of "ok" still reaches every stage
            bad = await p.send([worker_pb2.SeqInput(seq_id="nobody", token_ids=[5], offset=3,
                                                    sample=True)], release=["ok"])
            again = await p.send(first_step("again").seqs)
            return good, started, bad, again, await sessions(cluster), p.broken
        finally:
            await cluster.close()

    good, started, bad, again, after, broken = run(scenario())
    expected = reference_tokens(path, PROMPT, 1)
    assert [o.token for o in good.outputs] == expected
    assert started == [1, 1, 1]
    assert bad.error.startswith("stage 0 (w1, layers [0, ") and "unknown sequence" in bad.error
    assert not bad.outputs
    assert [o.token for o in again.outputs] == expected and not again.error
    assert after == [1, 1, 1]  # "ok" freed everywhere, "again" held
    assert broken is None


def test_a_killed_last_stage_breaks_the_pipeline_through_the_results_stream(model_dir):
    from conftest import GiB

    from coordinator.local import LocalWorkers

    path = model_dir(SPEC)
    local = LocalWorkers(2, memory=[GiB, GiB], names=["p", "q"])
    addresses = local.start()

    async def scenario():
        cluster = await loaded(path, addresses)
        broke = asyncio.get_running_loop().create_future()
        cluster.pipeline.on_broken = lambda why: broke.done() or broke.set_result(why)
        try:
            await cluster.pipeline.send(first_step("s").seqs)
            local.procs[1].kill()
            return await asyncio.wait_for(broke, 30)
        finally:
            await cluster.close()

    try:
        why = run(scenario())
    finally:
        local.stop()
    assert why.startswith("pipeline broken") or "stream ended" in why


def test_steps_queued_together_are_overlapped_and_exact(model_dir):
    """Prompt chunks of one sequence and a decode step queued at once on the MLX thread: each
    is begun before the one before has finished, with the outputs of running them one by one."""
    path = model_dir(SPEC)
    chunks = [PROMPT[:5], PROMPT[5:9], PROMPT[9:]]

    def messages():
        out = []
        for i, chunk in enumerate(chunks):
            out.append(worker_pb2.StageMessage(step_id=i + 1, seqs=[worker_pb2.SeqInput(
                seq_id="s", token_ids=chunk, offset=sum(map(len, chunks[:i])), start=i == 0,
                sample=i == len(chunks) - 1)]))
        return out

    def tokens(outs):
        return [[o.token for o in out.outputs] for out in outs]

    async def together(start, end):
        thread = MLXThread()
        runner = await thread.run(lambda: StageRunner(load_shard(path, start, end)))
        outs = await asyncio.gather(*(thread.step(runner, m, 0.0)[0] for m in messages()))
        thread.close()
        return outs, thread.overlapped

    first = StageRunner(load_shard(path, 0, 3))
    whole = StageRunner(load_shard(path, 0, SPEC.num_layers))
    hidden, ahead = run(together(0, 3)), run(together(0, SPEC.num_layers))
    assert [o.forward.seqs[0].hidden.data for o in hidden[0]] == \
        [first.run(m).forward.seqs[0].hidden.data for m in messages()]
    assert tokens(ahead[0]) == tokens([whole.run(m) for m in messages()])
    assert tokens(ahead[0])[-1] == reference_tokens(path, PROMPT, 1)
    assert hidden[1] >= 1 and ahead[1] >= 1


def test_a_results_stream_is_refused_by_a_stage_that_is_not_last(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        cluster = await loaded(path, workers)
        try:
            call = cluster.workers[0].stub.Results(
                worker_pb2.ResultsRequest(plan_id=cluster.plan_id))
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return None
        finally:
            await cluster.close()

    code, details = run(scenario())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last stage" in details


def test_a_new_plan_frees_the_old_shard_while_an_old_stream_is_still_open(model_dir, workers):
    big = ModelSpec(family="llama", num_layers=6, hidden_size=256, intermediate_size=768,
                    num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)

    async def scenario():
        old = await loaded(model_dir(big), workers)
        stream = old.workers[0].stub.Forward(metadata=((PLAN_METADATA_KEY, old.plan_id),))
        await stream.write(first_step("kept"))
        while (await sessions(old))[0] != 1:  # the old stage 0 holds a sequence
            await asyncio.sleep(0.01)
        new = await loaded(model_dir(SPEC), workers)
        try:
            return ([w.shard.weight_bytes for w in old.workers],
                    [w.shard.active_memory_bytes for w in new.workers],
                    [w.shard.weight_bytes for w in new.workers])
        finally:
            stream.cancel()
            await old.close()
            await new.close()

    old_weights, active, new_weights = run(scenario())
    for was, now, weights in zip(old_weights, active, new_weights, strict=True):
        assert now < weights + 0.25 * was, (was, now, weights)  # the old slice is gone


def test_a_middle_stage_counts_the_hidden_bytes_it_receives_and_sends(model_dir, workers):
    path = model_dir(SPEC)

    def activation_bytes(port: int) -> dict[str, float]:
        return counter_by(port, "shardline_activation_bytes", "direction")

    async def scenario():
        cluster = await loaded(path, workers)
        try:
            ports = [w.info.metrics_port for w in cluster.workers]
            before = [activation_bytes(p) for p in ports]
            await cluster.pipeline.send(first_step("counted").seqs)
            return before, [activation_bytes(p) for p in ports]
        finally:
            await cluster.close()

    before, after = run(scenario())
    moved = [{d: a[d] - b[d] for d in ("in", "out")} for b, a in zip(before, after, strict=True)]
    hidden = len(PROMPT) * 64 * 2  # the prompt's hidden states, bf16, hidden size 64
    assert moved[0] == {"in": 0, "out": hidden}
    assert moved[1] == {"in": hidden, "out": hidden}  # the middle stage: both ways
    assert moved[2] == {"in": hidden, "out": 0}


def test_a_slice_builds_its_next_step_only_once_told_its_output_has_left(model_dir):
    """The MLX thread prepares a guessed step (worker/lookahead.py) when `idle` says the output
    has been sent, not before: building a graph holds the GIL the event loop needs to send."""
    from conftest import until

    path = model_dir(SPEC)

    async def scenario():
        thread = MLXThread()
        prepared: list[float] = []
        thread.on_prepared = prepared.append
        runner = await thread.run(lambda: StageRunner(load_shard(path, 0, 3)))
        await thread.step(runner, first_step("s"), 0.0)[0]
        seen = []
        for i in range(5):
            decode = worker_pb2.StageMessage(step_id=2 + i, seqs=[worker_pb2.SeqInput(
                seq_id="s", token_ids=[7 + i], offset=len(PROMPT) + i, sample=True)])
            await thread.step(runner, decode, 0.0)[0]
            # a bare step after it: once it is done, so is whatever the thread does unasked
            await thread.step(runner, worker_pb2.StageMessage(step_id=100 + i), 0.0)[0]
            seen.append(len(prepared))  # before being told: nothing more prepared
            thread.idle()
            assert await until(lambda n=i: len(prepared) == n + 1, timeout=30)
        thread.close()
        return seen, runner.lookahead.taken

    seen, taken = run(scenario())
    assert seen == [0, 1, 2, 3, 4]
    assert taken == 4  # each decode step after the first was the one built ahead
