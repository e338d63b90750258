"""The coordinator's end of the pipeline: one persistent stream into stage 0, results by step."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

import grpc

import protos
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
                 secret: bytes | None = None) -> None:
        self.first_address = first_address
        self.plan_id = plan_id
        self._channel = auth.worker_channel(first_address, secret,
                                            protos.channel_options(max_message_bytes))
        self._call: Any = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        # Messages wait here in call order; one writer task drains them (gRPC takes one write
        # at a time), so a step is ordered when it is queued, without a task or lock per step.
        self._outbox: deque[tuple[worker_pb2.StageMessage, asyncio.Future | None]] = deque()
        self._writer: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None
        self.broken: str | None = None
        # called once, synchronously, when the pipeline breaks (before any step fails), so the
        # cluster can start recovering before the requests hear of it
        self.on_broken: Any = None

    async def open(self) -> None:
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._call = stub.Forward(metadata=((PLAN_METADATA_KEY, self.plan_id),))
        self._reader = asyncio.create_task(self._read())
        self._writer = asyncio.create_task(self._write())

    async def _read(self) -> None:
        try:
            async for result in self._call:
                future = self._pending.pop(result.step_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
            self.fail("the pipeline stream ended")
        except grpc.aio.AioRpcError as e:
            self.fail(f"pipeline broken: {e.details() or e.code().name}")
        except asyncio.CancelledError:
            self.fail("pipeline closed")
            raise

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
        step_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._queue(worker_pb2.StageMessage(step_id=step_id, seqs=seqs, release=release or []))
        self._pending[step_id] = future
        return future

    async def submit(self, seqs: list[worker_pb2.SeqInput],
                     release: list[str] | None = None) -> asyncio.Future:
        """Send one step into stage 0 now; the future resolves with the last stage's result.

        Steps are sent in call order, so a request may submit several prefill chunks back to
        back and let the stages work on them at once.
        """
        return self.send(seqs, release)

    @staticmethod
    async def result(future: asyncio.Future) -> worker_pb2.StageResult:
        """Wait for a submitted step; a stage's error becomes PipelineError."""
        result = await future
        if result.error:
            raise PipelineError(result.error)
        return result

    async def step(self, seqs: list[worker_pb2.SeqInput],
                   release: list[str] | None = None) -> worker_pb2.StageResult:
        """Run one step through every stage; returns the last stage's result."""
        return await self.result(await self.submit(seqs, release))

    async def release(self, seq_ids: list[str]) -> None:
        """Free these sequences' caches on every stage (no reply is awaited)."""
        if seq_ids and not self.broken:
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
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
