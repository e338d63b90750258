"""The token loop's short way round: stage 0 follows the last stage's sampled tokens itself.

A decode step's token goes from the last stage to the coordinator, which streams it to its
client and sends the next step to stage 0. Stage 0 has that step built already, on
placeholder inputs (worker/lookahead.py); following the last stage's results
(`Results` with `loop`, protos/worker.proto) it starts the step the moment the tokens are
sampled, one hop and the coordinator's turn earlier. The coordinator's message still decides:
it confirms the step started, or rolls it back and runs what it says (a stream ended, a new
prompt came), so what comes out is the same either way. Following is best effort: when the
stream fails, stage 0 waits for the coordinator's messages as before.

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

log = logging.getLogger("shardline.worker")


async def follow(channel: grpc.aio.Channel, plan_id: str, mlx: Any, runner: Any) -> None:
    """Hand every result of the last stage of `plan_id` to `mlx.early` until cancelled."""
    call = worker_pb2_grpc.WorkerStub(channel).Results(
        worker_pb2.ResultsRequest(plan_id=plan_id, loop=True))
    try:
        async for result in call:
            if result.outputs and not result.error and runner.awaits_verdict(result):
                mlx.early(runner, result)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            log.info("not following the last stage's tokens: %s", e.details())
    except asyncio.CancelledError:
        call.cancel()
        raise


class Loops:
    """The last stage's side: a queue per stage following a plan's results."""

    def __init__(self) -> None:
        self._queues: dict[str, list[asyncio.Queue]] = {}

    async def serve(self, plan_id: str):
        """Results with `loop`: the attached message, then a copy of each result."""
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
