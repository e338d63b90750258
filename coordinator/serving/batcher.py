"""Microbatching: decode steps and prompt chunks share the pipeline, one step per stage in flight.

Decode steps of the running sequences split into groups that circulate through the pipeline, so
every device computes at once, and each stage decodes a whole group with one read of its
weights (worker/batch.py). There are as many groups as steps the plan's devices compute at
once: one per stage where each worker has a machine of its own, fewer where workers share one
(workers on one GPU take turns on it, so there one group reads each stage's weights once for
every running sequence; coordinator/cluster/cluster.py `lanes`). Decode groups and prompt
chunks (chunked prefill) go through one cap of a step per stage in flight: when both are
waiting they take turns, so a long prompt neither stalls the running streams nor waits behind
them, and a lone prompt still keeps a chunk per stage in flight.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from coordinator.serving.pipeline import Pipeline, PipelineError
from protos import worker_pb2

# a step, its result, and the pipeline its sequence runs on (None: the current one). After a
# join re-plan, sequences started on the old pipeline finish there while new ones start on
# the new one (coordinator/cluster/cluster.py, "draining").
Item = tuple[worker_pb2.SeqInput, asyncio.Future, Pipeline | None]


class Microbatcher:
    """Collects decode steps and prompt chunks and sends them as steps, at most `stages` at once.

    A decode group is sent once it has its share of the running sequences (running / groups),
    or `wait` seconds after a place for it came free, whichever comes first; at most `groups`
    decode groups are in flight. A prefill step carries the oldest queued
    chunk of each of one or more prompts, up to `prefill_tokens` tokens (at least one chunk),
    so each prompt's chunks go out in order, one per step. When a decode group and prompt chunks
    both wait for a free place, they alternate.
    """

    def __init__(self, source: Any, stages: int, *, wait: float = 0.002,
                 max_batch: int = 64, prefill_tokens: int = 512) -> None:
        self._source = source  # anything with a `.pipeline` (and a `.plan`: the Cluster)
        self._stages = max(1, stages)
        self.wait = wait
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.active: set[str] = set()
        self._pending: list[Item] = []  # decode steps
        self._prefill: list[Item] = []  # prompt chunks, in the order they were queued
        self.in_flight = 0
        self.decode_in_flight = 0
        self.max_in_flight = 0  # high-water mark of steps in flight (decode and prefill)
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._decode_turn = True  # who goes first when both decode and prefill wait
        # released sequences a queued chunk still forks from: freed once it has been sent
        self._held: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # decode groups sent
        self.batched_steps = 0  # decode steps in them
        self.prefill_steps = 0  # prefill steps sent
        self.prefill_chunks = 0  # prompt chunks in them

    @property
    def stages(self) -> int:
        """Steps allowed in flight: the current plan's stages (it may change on a re-plan)."""
        plan = getattr(self._source, "plan", None)
        return len(getattr(plan, "stages", None) or ()) or self._stages

    def join(self, seq_id: str) -> None:
        self.active.add(seq_id)

    def leave(self, seq_id: str) -> None:
        self.active.discard(seq_id)
        self._kick()

    def submit(self, seq: worker_pb2.SeqInput, pipeline: Pipeline | None = None
               ) -> asyncio.Future:
        """Queue one decode step of `seq` for some microbatch on `pipeline` (default: the
        current one); the future resolves with its sampled token (cancel it to drop the step
        if it has not been sent yet)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((seq, future, pipeline))
        self._kick()
        return future

    def prefill(self, chunks: Sequence[worker_pb2.SeqInput],
                pipeline: Pipeline | None = None) -> list[asyncio.Future]:
        """Queue one prompt's chunks, in order; a future per chunk resolves with its SeqOutput
        (the sampled token, for a chunk with `sample`) or None, or fails with PipelineError.

        Cancel the futures to drop the chunks not sent yet.
        """
        loop = asyncio.get_running_loop()
        items = [(chunk, loop.create_future(), pipeline) for chunk in chunks]
        self._prefill.extend(items)
        self._kick()
        return [future for _, future, _ in items]

    async def release(self, pipeline: Pipeline, seq_ids: list[str]) -> None:
        """Free these sequences on every stage now; one that a queued chunk still forks from
        (the prefix cache evicted it meanwhile) is freed right after that chunk is sent."""
        self._drop_done()
        if pipeline is self._source.pipeline:
            wanted = self._fork_sources()
            self._held.update(i for i in seq_ids if i in wanted)
            seq_ids = [i for i in seq_ids if i not in wanted]
        await pipeline.release(seq_ids)

    # -- sending ------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        """Decode groups in flight at once: the steps the plan's devices compute together
        (the source's `lanes`), at most the stages."""
        lanes = getattr(self._source, "lanes", None)
        return min(self.stages, lanes) if isinstance(lanes, int) and lanes > 0 else self.stages

    def _target(self) -> int:
        return min(self.max_batch, max(1, math.ceil(len(self.active) / self.groups)))

    def _decode_room(self) -> bool:
        return self.decode_in_flight < self.groups

    def _decode_ready(self) -> bool:
        return bool(self._pending) and self._decode_room() and (
            len(self._pending) >= self._target() or self._expired)

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        self._kick()

    def _drop_done(self) -> None:
        """Forget steps whose future is done (cancelled: the request no longer wants them)."""
        if any(item[1].done() for item in self._pending):
            self._pending = [item for item in self._pending if not item[1].done()]
        if any(item[1].done() for item in self._prefill):
            self._prefill = [item for item in self._prefill if not item[1].done()]

    def _fork_sources(self) -> set[str]:
        return {item[0].fork_from for item in self._prefill if item[0].fork_from}

    def _kick(self) -> None:
        self._drop_done()
        while self.in_flight < self.stages:
            ready = self._decode_ready()
            if self._pending and not ready and self._timer is None and self._decode_room():
                # a place is free: give the group `wait` seconds to fill up (not while every
                # group's place is taken: the steps then wait for a group to come back, and go
                # with its sequences, not on their own)
                self._timer = asyncio.get_running_loop().call_later(self.wait, self._expire)
            if ready and (self._decode_turn or not self._prefill):
                self._send_decode()
                self._decode_turn = False
            elif self._prefill:
                self._send_prefill()
                self._decode_turn = True
            else:
                break
        if self._held:
            free = self._held - self._fork_sources()
            if free:
                self._held -= free
                self._release_later(sorted(free))

    def _send_decode(self) -> None:
        target = self._target()
        # one step goes to one pipeline: the first waiting step's, with others of the same
        where = self._pending[0][2]
        group = [item for item in self._pending if item[2] is where][:target]
        taken = set(map(id, group))
        self._pending = [item for item in self._pending if id(item) not in taken]
        # one order for the same sequences, step after step, whatever order their streams
        # asked in: a stage keeps their batch caches merged and its decode-ahead guess holds
        group.sort(key=lambda item: item[0].seq_id)
        self._expired = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.batches += 1
        self.batched_steps += len(group)
        self._send(group, decode=True)

    def _send_prefill(self) -> None:
        """One step: the oldest queued chunk of each prompt, oldest first, within the budget."""
        step: list[Item] = []
        rest: list[Item] = []
        seen: set[str] = set()  # prompts with a chunk taken or left behind: their next waits
        tokens = 0
        where = self._prefill[0][2]
        for item in self._prefill:
            seq = item[0]
            fits = item[2] is where and (not step or (
                tokens + len(seq.token_ids) <= self.prefill_tokens and len(step) < self.max_batch))
            if seq.seq_id not in seen and fits:
                step.append(item)
                tokens += len(seq.token_ids)
            else:
                rest.append(item)
            seen.add(seq.seq_id)
        self._prefill = rest
        self.prefill_steps += 1
        self.prefill_chunks += len(step)
        self._send(step)

    def _send(self, group: list[Item], decode: bool = False) -> None:
        """Queue the group on its pipeline now (in order); its result resolves the futures."""
        try:
            pipeline = group[0][2] or self._source.pipeline
            sent = pipeline.send([item[0] for item in group])
        except (PipelineError, AttributeError) as e:
            _fail(group, str(e))
            return
        self.in_flight += 1
        self.decode_in_flight += decode
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def done(sent: asyncio.Future) -> None:
            self.in_flight -= 1
            self.decode_in_flight -= decode
            try:
                result = Pipeline.result(sent)
            except (PipelineError, asyncio.CancelledError) as e:
                _fail(group, str(e) or "pipeline closed")
            else:
                outputs = {o.seq_id: o for o in result.outputs}
                for seq, future, _ in group:
                    if future.done():
                        continue
                    out = outputs.get(seq.seq_id)
                    if out is None and seq.sample:
                        future.set_exception(PipelineError(f"no token for {seq.seq_id}"))
                    else:
                        future.set_result(out)
            self._kick()

        sent.add_done_callback(done)

    def _release_later(self, seq_ids: list[str]) -> None:
        """Free held sequences behind the steps already queued (their forks went out first)."""
        pipeline = self._source.pipeline
        if pipeline is None or pipeline.broken:
            return
        task = asyncio.ensure_future(pipeline.release(seq_ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _fail(group: list[Item], reason: str) -> None:
    for _, future, _ in group:
        if not future.done():
            future.set_exception(PipelineError(reason))
