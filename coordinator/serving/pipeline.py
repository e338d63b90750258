"""The coordinator's end of the pipeline: a stream into stage 0, the last stage's results by step.

Steps go into stage 0 on one persistent Forward stream; each stage forwards to the next. The
last stage's results come straight to the coordinator on a Results stream (one hop, not one
back through every earlier stage), or on the Forward stream when stage 0 is the last stage.
With `ahead`, each decode step names the id of the one after it (coordinator/serving/ahead.py):
stage 0 may send that one on before its message, and its result may come first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

import grpc

import protos
from coordinator.serving.ahead import Reservations
from protos import auth, worker_pb2, worker_pb2_grpc

log = logging.getLogger("shardline.pipeline")

PLAN_METADATA_KEY = "x-shardline-plan"


class PipelineError(RuntimeError):
    """A step failed on a stage, or the pipeline stream broke."""


class Pipeline:
    """Sends steps into stage 0 and matches the last stage's results back to them.

    Steps from many requests may be in flight at once; each stage runs them in arrival order.
    """

    def __init__(self, first_address: str, plan_id: str,
                 max_message_bytes: int = protos.DEFAULT_MAX_MESSAGE_BYTES,
                 secret: bytes | None = None, last_address: str | None = None,
                 ahead: bool = False) -> None:
        self.first_address = first_address
        self.last_address = last_address if last_address != first_address else None
        self.plan_id = plan_id
        options = protos.channel_options(max_message_bytes)
        self._channel = auth.worker_channel(first_address, secret, options)
        self._last_channel = (auth.worker_channel(self.last_address, secret, options)
                              if self.last_address else None)
        self._call: Any = None
        self._results: Any = None
        self._readers: list[asyncio.Task] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.ahead = Reservations() if ahead else None  # ids named ahead (ahead.py)
        # Messages wait here in call order; one writer task drains them (gRPC takes one write
        # at a time), so a step is ordered when it is queued, without a task or lock per step.
        self._outbox: deque[tuple[worker_pb2.StageMessage, asyncio.Future | None]] = deque()
        self._writer: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None
        self.broken: str | None = None
        self.users = 0  # requests running on it (coordinator/serving/engine.py)
        # replaced by a re-plan: its running requests finish on it, then it closes
        self.retired = False
        # called once, synchronously, when the pipeline breaks (before any step fails), so the
        # cluster can start recovering before the requests hear of it
        self.on_broken: Any = None

    async def open(self) -> None:
        """Attach to the last stage's results (waiting until it says so), then open stage 0."""
        if self._last_channel is not None:
            last = worker_pb2_grpc.WorkerStub(self._last_channel)
            self._results = last.Results(worker_pb2.ResultsRequest(plan_id=self.plan_id))
            results = aiter(self._results)
            try:
                await anext(results)  # the empty first message: attached
            except grpc.aio.AioRpcError as e:
                raise PipelineError(f"cannot attach to the last stage {self.last_address}: "
                                    f"{e.details() or e.code().name}") from None
            except StopAsyncIteration:
                raise PipelineError(f"the last stage {self.last_address} ended its results "
                                    "stream at once") from None
            self._readers.append(asyncio.create_task(self._read(results, "results")))
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._call = stub.Forward(metadata=((PLAN_METADATA_KEY, self.plan_id),))
        self._readers.append(asyncio.create_task(self._read(self._call, "pipeline")))
        self._writer = asyncio.create_task(self._write())

    async def _read(self, call: Any, name: str) -> None:
        """Resolve the steps whose results `call` brings; its end or failure breaks the
        pipeline (the other stream's failure that follows a break keeps the first reason,
        and what the cluster said since)."""
        why = "pipeline closed"  # cancelled
        try:
            async for result in call:
                future = self._pending.pop(result.step_id, None)
                if self.ahead is not None:
                    self.ahead.arrived(result, future is not None)
                if future is not None and not future.done():
                    future.set_result(result)
            why = f"the {name} stream ended"
        except grpc.aio.AioRpcError as e:
            why = f"pipeline broken: {e.details() or e.code().name}"
        finally:
            if not self.broken:
                self.fail(why)

    def fail(self, reason: str) -> None:
        """Break the pipeline now: every step in flight or queued fails with `reason`."""
        first = self.broken is None
        self.broken = reason
        if first and self.on_broken is not None:
            try:
                self.on_broken(reason)
            except Exception:  # noqa: BLE001 - a failing observer must not hide the failure
                log.exception("pipeline break handler failed")
        pending, self._pending = self._pending, {}
        if self.ahead is not None:
            self.ahead.clear()
        outbox, self._outbox = self._outbox, deque()
        for future in [*pending.values(), *(f for _, f in outbox if f is not None)]:
            if not future.done():
                future.set_exception(PipelineError(reason))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _write(self) -> None:
        """Write queued messages in order; a failed write breaks the pipeline."""
        loop = asyncio.get_running_loop()
        while not self.broken:
            if not self._outbox:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
                continue
            msg, written = self._outbox.popleft()
            try:
                await self._call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                # the first reason, said once: the reader may have broken the pipeline already
                # (its reason has the prefix), and str() of an AioRpcError is its whole repr
                why = (e.details() or e.code().name) if isinstance(e, grpc.aio.AioRpcError) \
                    else str(e)
                error = PipelineError(self.broken or f"pipeline broken: {why}")
                if written is not None and not written.done():
                    written.set_exception(error)
                self.fail(str(error))
                return
            if written is not None and not written.done():
                written.set_result(None)

    def _queue(self, msg: worker_pb2.StageMessage, written: asyncio.Future | None = None) -> None:
        if self.broken:
            raise PipelineError(self.broken)
        self._outbox.append((msg, written))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _send(self, msg: worker_pb2.StageMessage) -> None:
        """Queue `msg` and wait until it is written."""
        written = asyncio.get_running_loop().create_future()
        self._queue(msg, written)
        await written

    def send(self, seqs: list[worker_pb2.SeqInput],
             release: list[str] | None = None) -> asyncio.Future:
        """Queue one step for stage 0 now (no await); the future resolves with the last stage's
        result, or fails with PipelineError. Steps are written in call order."""
        if self.broken:
            raise PipelineError(self.broken)
        future = asyncio.get_running_loop().create_future()
        step_id, after, early = self.ahead.assign(seqs, release or [], self._ids) \
            if self.ahead is not None else (next(self._ids), 0, None)
        self._queue(worker_pb2.StageMessage(step_id=step_id, seqs=seqs, release=release or [],
                                            next_step_id=after))
        if early is not None:  # stage 0 sent it on ahead: its message only confirms it
            future.set_result(early)
        else:
            self._pending[step_id] = future
        return future

    @staticmethod
    def result(future: asyncio.Future) -> worker_pb2.StageResult:
        """The result of a done step; a stage's error becomes PipelineError."""
        result = future.result()
        if result.error:
            raise PipelineError(result.error)
        return result

    async def release(self, seq_ids: list[str]) -> None:
        """Free these sequences' caches on every stage (no reply is awaited)."""
        if seq_ids and not self.broken:
            if self.ahead is not None:
                self.ahead.give_up(seq_ids)
            try:
                await self._send(worker_pb2.StageMessage(step_id=next(self._ids),
                                                         release=seq_ids))
            except PipelineError as e:
                log.warning("could not release %s: %s", seq_ids, e)

    async def close(self) -> None:
        self.on_broken = None  # closing is not breaking
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._call is not None and not self.broken:
            try:
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        for reader in self._readers:
            reader.cancel()
        if self._results is not None:
            self._results.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)  # none left pending
        await self._channel.close()
        if self._last_channel is not None:
            await self._last_channel.close()
