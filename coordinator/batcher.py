"""Microbatches: decode steps of running sequences grouped, at most one group per stage in flight.

With N stages and many sequences, the running sequences split into N groups that circulate
through the pipeline, so every stage computes at once, and each stage decodes a whole group
with one read of its weights (worker/batch.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from coordinator.pipeline import PipelineError
from protos import worker_pb2


class Microbatcher:
    """Collects one-token decode steps and sends them as microbatches.

    A group is sent once it has its share of the running sequences (running / stages), or after
    `wait` seconds, whichever comes first, while fewer than `stages` groups are in flight.
    """

    def __init__(self, source: Any, stages: int, *, wait: float = 0.002,
                 max_batch: int = 64) -> None:
        self._source = source  # anything with a `.pipeline` (the Cluster)
        self.stages = max(1, stages)
        self.wait = wait
        self.max_batch = max_batch
        self.active: set[str] = set()
        self._pending: list[tuple[worker_pb2.SeqInput, asyncio.Future]] = []
        self.in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self.batches = 0
        self.batched_steps = 0

    def join(self, seq_id: str) -> None:
        self.active.add(seq_id)

    def leave(self, seq_id: str) -> None:
        self.active.discard(seq_id)
        self._kick()

    def submit(self, seq: worker_pb2.SeqInput) -> asyncio.Future:
        """Queue one decode step of `seq` for some microbatch; the future resolves with its
        sampled token (cancel it to drop the step if it has not been sent yet)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((seq, future))
        self._kick()
        return future

    async def step(self, seq: worker_pb2.SeqInput) -> worker_pb2.SeqOutput:
        """Run one decode step of `seq` in some microbatch; returns its sampled token."""
        return await self.submit(seq)

    def _target(self) -> int:
        return min(self.max_batch, max(1, math.ceil(len(self.active) / self.stages)))

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        self._kick()

    def _kick(self) -> None:
        if any(f.done() for _, f in self._pending):
            self._pending = [(s, f) for s, f in self._pending if not f.done()]
        while self._pending and self.in_flight < self.stages:
            target = self._target()
            if len(self._pending) < target and not self._expired:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.wait, self._expire)
                return
            group, self._pending = self._pending[:target], self._pending[target:]
            self._expired = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._send(group)

    def _send(self, group: list[tuple[worker_pb2.SeqInput, asyncio.Future]]) -> None:
        """Queue the group on the pipeline now (in order); its result resolves the futures."""
        self.batches += 1
        self.batched_steps += len(group)
        try:
            sent = self._source.pipeline.send([seq for seq, _ in group])
        except (PipelineError, AttributeError) as e:
            _fail(group, str(e))
            return
        self.in_flight += 1

        def done(sent: asyncio.Future) -> None:
            self.in_flight -= 1
            try:
                result = sent.result()
                if result.error:
                    raise PipelineError(result.error)
            except (PipelineError, asyncio.CancelledError) as e:
                _fail(group, str(e) or "pipeline closed")
            else:
                outputs = {o.seq_id: o for o in result.outputs}
                for seq, future in group:
                    if not future.done():
                        if seq.seq_id in outputs:
                            future.set_result(outputs[seq.seq_id])
                        else:
                            future.set_exception(PipelineError(f"no token for {seq.seq_id}"))
            self._kick()

        sent.add_done_callback(done)


def _fail(group: list[tuple[worker_pb2.SeqInput, asyncio.Future]], reason: str) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(PipelineError(reason))
