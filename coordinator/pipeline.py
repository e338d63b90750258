"""The coordinator's end of the pipeline: one persistent stream into stage 0, results by step."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc

import protos
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger("shardline.pipeline")

PLAN_METADATA_KEY = "x-shardline-plan"


class PipelineError(RuntimeError):
    """A step failed on a stage, or the pipeline stream broke."""


class Pipeline:
    """Sends steps into stage 0 and matches the last stage's results back to them.

    Steps from many requests may be in flight at once; each stage runs them in arrival order.
    """

    def __init__(self, first_address: str, plan_id: str,
                 max_message_bytes: int = protos.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.first_address = first_address
        self.plan_id = plan_id
        self._channel = grpc.aio.insecure_channel(
            first_address, options=protos.channel_options(max_message_bytes)
        )
        self._call: Any = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self.broken: str | None = None

    async def open(self) -> None:
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._call = stub.Forward(metadata=((PLAN_METADATA_KEY, self.plan_id),))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for result in self._call:
                future = self._pending.pop(result.step_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
            self._fail("the pipeline stream ended")
        except grpc.aio.AioRpcError as e:
            self._fail(f"pipeline broken: {e.details() or e.code().name}")
        except asyncio.CancelledError:
            self._fail("pipeline closed")
            raise

    def _fail(self, reason: str) -> None:
        self.broken = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(PipelineError(reason))

    async def _send(self, msg: worker_pb2.StageMessage) -> None:
        if self.broken:
            raise PipelineError(self.broken)
        async with self._write_lock:
            try:
                await self._call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                raise PipelineError(f"pipeline broken: {e}") from e

    async def submit(self, seqs: list[worker_pb2.SeqInput],
                     release: list[str] | None = None) -> asyncio.Future:
        """Send one step into stage 0 now; the future resolves with the last stage's result.

        Steps are sent in call order, so a request may submit several prefill chunks back to
        back and let the stages work on them at once.
        """
        step_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        try:
            await self._send(worker_pb2.StageMessage(step_id=step_id, seqs=seqs,
                                                     release=release or []))
        except PipelineError:
            self._pending.pop(step_id, None)
            raise
        return future

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
        if self._call is not None and not self.broken:
            try:
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
