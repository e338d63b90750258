"""The microbatcher: one cap of steps in flight shared by decode groups and prompt chunks."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run

from coordinator.serving.batcher import Microbatcher
from coordinator.serving.pipeline import PipelineError
from protos import worker_pb2


class FakePipeline:
    """Records what is sent, in order; the test resolves each step's future by hand."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[str]]] = []
        self.steps: list[tuple[list[worker_pb2.SeqInput], asyncio.Future]] = []
        self.broken: str | None = None

    def send(self, seqs, release=None) -> asyncio.Future:
        if self.broken:
            raise PipelineError(self.broken)
        future = asyncio.get_running_loop().create_future()
        self.log.append(("step", [f"{s.seq_id}@{s.offset}" for s in seqs]))
        self.steps.append((list(seqs), future))
        return future

    async def release(self, seq_ids: list[str]) -> None:
        if seq_ids:
            self.log.append(("release", list(seq_ids)))

    def finish(self, i: int, error: str = "") -> None:
        """Resolve step i as the last stage would: a token for every row that samples."""
        seqs, future = self.steps[i]
        outputs = [worker_pb2.SeqOutput(seq_id=s.seq_id, token=s.offset)
                   for s in seqs if s.sample and not error]
        future.set_result(worker_pb2.StageResult(step_id=i, outputs=outputs, error=error))

    @property
    def in_flight(self) -> int:
        return sum(not f.done() for _, f in self.steps)


class Source:
    def __init__(self, lanes: int | None = None) -> None:
        self.pipeline = FakePipeline()
        self.plan = None
        if lanes is not None:  # steps the plan's devices compute at once (Cluster.lanes)
            self.lanes = lanes


def prompt(seq_id: str, sizes: list[int], fork_from: str = "") -> list[worker_pb2.SeqInput]:
    """Chunks of `sizes` tokens, then the last token, which samples (as Engine._chunks does)."""
    out, pos = [], 0
    for n in [*sizes, 1]:
        out.append(worker_pb2.SeqInput(seq_id=seq_id, token_ids=[7] * n, offset=pos))
        pos += n
    out[-1].sample = True
    out[0].start = True
    if fork_from:
        out[0].fork_from, out[0].fork_length = fork_from, 4
    return out


def decode(seq_id: str, offset: int) -> worker_pb2.SeqInput:
    return worker_pb2.SeqInput(seq_id=seq_id, token_ids=[1], offset=offset, sample=True)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_lone_prompt_keeps_one_chunk_per_stage_in_flight_in_order():
    async def scenario():
        src = Source()
        b = Microbatcher(src, 3, prefill_tokens=8)
        futures = b.prefill(prompt("a", [8, 8, 8, 8]))
        sent = [src.pipeline.log[:]]
        for i in range(5):
            src.pipeline.finish(i)
            await settle()
            sent.append(src.pipeline.in_flight)
        out = await futures[-1]
        return src.pipeline.log, sent, b.max_in_flight, out.token, futures[0].result()

    log, sent, peak, token, first = run(scenario())
    assert sent[0] == [("step", ["a@0"]), ("step", ["a@8"]), ("step", ["a@16"])]
    assert [entry for _, entry in log] == [["a@0"], ["a@8"], ["a@16"], ["a@24"], ["a@32"]]
    assert sent[1:] == [3, 3, 2, 1, 0] and peak == 3
    assert token == 32 and first is None  # a chunk that does not sample resolves with None


def test_decode_and_prefill_share_the_cap_and_take_turns():
    async def scenario():
        src = Source()
        b = Microbatcher(src, 3, prefill_tokens=8)
        for s in ("x", "y", "z"):
            b.join(s)  # target group size: ceil(3 / 3) = 1
        b.prefill(prompt("long", [8] * 6))  # takes all three places
        steps = {s: b.submit(decode(s, 100)) for s in ("x", "y", "z")}
        peak = src.pipeline.in_flight
        for i in range(8):
            src.pipeline.finish(i)
            await settle()
            peak = max(peak, src.pipeline.in_flight)
        return [e for _, e in src.pipeline.log], peak, b.max_in_flight, steps

    log, peak, high, steps = run(scenario())
    assert log[:3] == [["long@0"], ["long@8"], ["long@16"]]
    # every freed place alternates: a decode group, then a chunk, then a decode group...
    assert log[3:9] == [["x@100"], ["long@24"], ["y@100"], ["long@32"], ["z@100"], ["long@40"]]
    assert peak == high == 3
    assert all(f.result().token == 100 for f in steps.values())


def test_prompts_share_a_step_within_the_budget_one_chunk_each_in_order():
    async def scenario():
        src = Source()
        b = Microbatcher(src, 1, prefill_tokens=8)
        b.submit(decode("busy", 5))  # holds the only place while the prompts queue up
        b.prefill(prompt("a", [4, 4]))
        b.prefill(prompt("b", [3]))
        b.prefill(prompt("c", [7]))
        for i in range(5):
            src.pipeline.finish(i)
            await settle()
        return [e for _, e in src.pipeline.log]

    log = run(scenario())
    # a@8 and c@0 fill the 8-token budget; c@7 waits for c@0, as a@4 waited for a@0
    assert log == [["busy@5"], ["a@0", "b@0"], ["a@4", "b@3"], ["a@8", "c@0"], ["c@7"]]


def test_cancelled_chunks_are_dropped_and_failures_reach_every_chunk():
    async def scenario():
        src = Source()
        b = Microbatcher(src, 1, prefill_tokens=8)
        dropped = b.prefill(prompt("gone", [8, 8]))
        for f in dropped:
            f.cancel()
        src.pipeline.finish(0)  # the first chunk was already sent; the rest never is
        await settle()
        sent_after_cancel = [e for _, e in src.pipeline.log]
        failing = b.prefill(prompt("bad", [8, 8]))
        src.pipeline.finish(1, error="stage 1: boom")
        await settle()
        error = failing[0].exception()
        src.pipeline.broken = "pipeline broken: worker lost"
        src.pipeline.steps[-1][1].set_exception(PipelineError(src.pipeline.broken))
        await settle()  # bad@8 fails with the pipeline; bad@16, not sent yet, when it is tried
        later = [str(f.exception()) for f in failing[1:]]
        return sent_after_cancel, error, later, b.in_flight

    sent, error, later, in_flight = run(scenario())
    assert sent == [["gone@0"]]
    assert isinstance(error, PipelineError) and str(error) == "stage 1: boom"
    assert later == ["pipeline broken: worker lost"] * 2 and in_flight == 0


def test_a_release_waits_for_a_queued_chunk_that_forks_from_it():
    async def scenario():
        src = Source()
        b = Microbatcher(src, 1, prefill_tokens=8)
        busy = b.submit(decode("busy", 5))
        fork = b.prefill(prompt("new", [8], fork_from="old"))
        await b.release(src.pipeline, ["old", "other"])  # "old" evicted meanwhile
        before = list(src.pipeline.log)
        src.pipeline.finish(0)
        await settle()
        src.pipeline.finish(1)
        await settle()
        src.pipeline.finish(2)
        await busy, fork[-1]
        return before, src.pipeline.log

    before, log = run(scenario())
    assert before == [("step", ["busy@5"]), ("release", ["other"])]
    assert log[2:4] == [("step", ["new@0"]), ("release", ["old"])]


@pytest.mark.parametrize("cancel", [True, False])
def test_a_held_release_goes_out_once_the_forking_chunk_is_gone(cancel):
    async def scenario():
        src = Source()
        b = Microbatcher(src, 1, prefill_tokens=8)
        b.submit(decode("busy", 5))
        fork = b.prefill(prompt("new", [8], fork_from="old"))
        await b.release(src.pipeline, ["old"])
        if cancel:
            for f in fork:
                f.cancel()
            b.leave("new")  # as the engine does when the request ends
        await settle()
        return [e for e in src.pipeline.log if e[0] == "release"]

    assert run(scenario()) == ([("release", ["old"])] if cancel else [])


@pytest.mark.parametrize("lanes", [1, 3])
def test_stages_that_share_one_device_decode_every_sequence_in_one_group(lanes):
    """Three stages on one device (lanes 1): one decode group of all running sequences, and a
    sequence that comes while it is in flight waits for it and goes with it, however long the
    wait; on three devices (lanes 3) it goes on its own once `wait` passed, in a second group."""
    async def scenario():
        src = Source(lanes)
        b = Microbatcher(src, 3, wait=0.0)
        for s in ("a", "b", "c", "d"):
            b.join(s)
        first = [b.submit(decode(s, 10)) for s in ("a", "b", "c")]
        await settle()
        late = b.submit(decode("d", 10))  # its step came after the others left
        await settle()
        log = [e for _, e in src.pipeline.log]
        for i in range(len(src.pipeline.steps)):
            src.pipeline.finish(i)
        # the engine sends a sequence's next step as soon as its token is in
        again = [b.submit(decode(s, 11)) for s in ("a", "b", "c")]
        await settle()
        return log, [e for _, e in src.pipeline.log], b.groups, first + [late] + again

    log, after, groups, futures = run(scenario())
    if lanes == 1:
        assert groups == 1
        assert log == [["a@10", "b@10", "c@10"]]  # wait=0 passed, and d still waited
        assert after[1:] == [["a@11", "b@11", "c@11", "d@10"]]  # with the group, not alone
    else:
        assert groups == 3  # groups of ceil(4 / 3) = 2, or what came within `wait`
        assert log == [["a@10", "b@10"], ["c@10"], ["d@10"]]
    assert all(f.done() for f in futures[:3])
