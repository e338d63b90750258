"""The token loop's short way round: stage 0 follows the last stage's sampled tokens itself.

A decode step's token goes from the last stage to the coordinator, which streams it to its
client and sends the next step to stage 0. Stage 0 has that step built already, on
placeholder inputs (worker/lookahead.py); following the last stage's results
(`Results` with `loop`, protos/worker.proto) it starts the step the moment the tokens are
sampled, one hop and the coordinator's turn earlier (on a direct link, worker/link.py, the
last stage's MLX thread writes them and stage 0's reads them), and sends it on to stage 1 when
the coordinator has named it already (worker/sent_ahead.py). The coordinator's message still
decides: it confirms the step, or rolls it back (in every stage it reached) and runs what it
says (a stream ended, a new prompt came), so what comes out is the same either way. Following
is best effort: when the stream fails, stage 0 waits for the coordinator's messages as before.

The stages between follow too, once steps with proposals come: the last stage's verdict on a
check tells them which positions stay, so they build the next check ahead
(worker/check_ahead.py); the last stage hears its own verdicts (worker/server.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from protos import worker_pb2, worker_pb2_grpc
from worker import link

log = logging.getLogger("shardline.worker")


async def follow(channel: grpc.aio.Channel, spec: worker_pb2.ShardSpec, mlx: Any, runner: Any,
                 secret: bytes | None = None, ask: bool = False, ahead: Any = None) -> None:
    """Hand every result of the last stage of `spec`'s plan to `mlx.early` until cancelled
    (with `ask`, on a direct link when the last stage gives one; `ahead`: how stage 0 sends
    a step on before its message, worker/sent_ahead.py)."""
    call = worker_pb2_grpc.WorkerStub(channel).Results(
        worker_pb2.ResultsRequest(plan_id=spec.plan_id, loop=True),
        metadata=((link.LINK_KEY, "1"),) if ask else None)
    sock = None

    def take(result: worker_pb2.StageResult) -> None:
        if result.outputs and not result.error and runner.awaits_verdict(result):
            mlx.early(runner, result, ahead)

    def ended(error: BaseException | None) -> None:
        if error is not None:
            log.info("the link to the last stage ended: %s", error)

    try:
        sock = await link.connect(call, spec.last_address, secret) if ask else None
        if sock is not None:  # read on the MLX thread: only the attached message comes below
            reader = link.LinkReader(
                sock, spec.max_message_bytes or (1 << 31),
                lambda data, _: take(worker_pb2.StageResult.FromString(data)), ended)
            mlx.watch(sock, reader.read)
        async for result in call:
            take(result)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            log.info("not following the last stage's tokens: %s", e.details())
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:
        if sock is not None:
            mlx.unwatch(sock)


class Loops:
    """The last stage's side: a queue per stage following a plan's results."""

    def __init__(self) -> None:
        self._queues: dict[str, list[asyncio.Queue]] = {}
        self._writers: dict[str, tuple[link.LinkWriter, ...]] = {}

    def writers(self, plan_id: str) -> tuple[link.LinkWriter, ...]:
        """The direct links of the stages following `plan_id` (read from any thread; the
        last stage's MLX thread writes each result on them as it finishes)."""
        return self._writers.get(plan_id, ())

    async def serve(self, plan_id: str, offered: asyncio.Future | None = None):
        """Results with `loop`: the attached message, then a copy of each result (on the link
        `offered`, once connected: then nothing more on the call)."""
        if offered is not None:
            try:
                writer = link.LinkWriter(await asyncio.shield(offered))
            except asyncio.CancelledError:
                if not offered.cancelled():  # the call ended
                    if offered.done():  # connected just now
                        offered.result().close()
                    offered.cancel()  # (a connection coming later is refused)
                    raise
            else:  # (a tuple replaced whole: the MLX thread reads it without a lock)
                self._writers[plan_id] = (*self.writers(plan_id), writer)
                try:
                    yield worker_pb2.StageResult()
                    await asyncio.get_running_loop().create_future()  # until the call ends
                finally:
                    rest = tuple(w for w in self.writers(plan_id) if w is not writer)
                    self._writers[plan_id] = rest
                    if not rest:
                        del self._writers[plan_id]
                    writer.abort()
                return
        queue: asyncio.Queue[worker_pb2.StageResult] = asyncio.Queue()
        self._queues.setdefault(plan_id, []).append(queue)
        try:
            yield worker_pb2.StageResult()
            while True:
                yield await queue.get()
        finally:
            self._queues[plan_id].remove(queue)
            if not self._queues[plan_id]:
                del self._queues[plan_id]

    def send(self, plan_id: str, result: worker_pb2.StageResult) -> None:
        """A copy of `result` to every stage following `plan_id` (tokens only)."""
        if result.outputs and not result.error:
            for queue in self._queues.get(plan_id, ()):
                queue.put_nowait(result)
