"""The worker's gRPC service: describe itself, load a shard, run and forward pipeline steps."""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx

import protos
from protos import auth, worker_pb2, worker_pb2_grpc
from worker.backend import Hardware
from worker.metrics import WorkerMetrics, hidden_bytes
from worker.shard import ShardError, load_shard
from worker.stage import StageRunner, StepError, StepOutput

log = logging.getLogger("shardline.worker")

PLAN_METADATA_KEY = "x-shardline-plan"


@dataclass
class WorkerConfig:
    """Who this worker is and where it looks for models."""

    node_id: str
    name: str
    hardware: Hardware
    cluster: str = "default"
    models_dir: Path | None = None
    metrics_port: int = 0
    secret: bytes | None = None  # the cluster secret: every call must be signed with it


class MLXThread:
    """The one thread that does all of this worker's MLX work (arrays are bound to a thread).

    A plain thread with a queue: a call costs one wake-up of this thread and one
    `call_soon_threadsafe` back to the loop (no executor or chained futures per step).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="shardline-mlx", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            loop, future, fn, args = item
            if future.cancelled():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
        while True:  # closed: whatever is still queued will not run
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[0].call_soon_threadsafe(item[1].cancel)

    async def run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the MLX thread is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return await future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one shard at a time; a new LoadShard replaces the previous one."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or WorkerMetrics(config.hardware.memory_bytes)
        self.mlx = MLXThread()
        self.runner: StageRunner | None = None
        self.shard_info: worker_pb2.ShardInfo | None = None
        self._load_lock = asyncio.Lock()
        self._channels: dict[str, grpc.aio.Channel] = {}

    # -- Info -------------------------------------------------------------------------------
    async def Info(self, request: worker_pb2.InfoRequest, context: Any) -> worker_pb2.WorkerInfo:
        hw = self.config.hardware
        return worker_pb2.WorkerInfo(
            id=self.config.node_id,
            name=self.config.name,
            version=protos.__version__,
            api=protos.WIRE_VERSION,
            memory_bytes=hw.memory_bytes,
            bandwidth_gbps=hw.bandwidth_gbps or 0.0,
            chip=hw.chip,
            backend=hw.backend,
            cluster=self.config.cluster,
            metrics_port=self.config.metrics_port,
            shard=self.shard_info,
            sessions=len(self.runner.sessions) if self.runner else 0,
            proof=auth.prove(self.config.secret, request.challenge)
            if self.config.secret and request.challenge else b"",
            kv_bytes=self.metrics.kv_bytes if self.runner else 0,
        )

    # -- LoadShard --------------------------------------------------------------------------
    def _model_path(self, spec: worker_pb2.ShardSpec) -> Path:
        if self.config.models_dir and spec.model_id:
            candidate = self.config.models_dir / spec.model_id
            if (candidate / "config.json").is_file():
                return candidate
        return Path(spec.model_path)

    def _load(self, spec: worker_pb2.ShardSpec) -> worker_pb2.ShardInfo:
        self.runner = None
        gc.collect()
        mx.clear_cache()
        shard = load_shard(self._model_path(spec), spec.layer_start, spec.layer_end)
        if shard.num_layers != spec.num_layers:
            raise ShardError(
                f"model at {spec.model_path} has {shard.num_layers} layers, plan says "
                f"{spec.num_layers}"
            )
        self.runner = StageRunner(shard)
        self.metrics.sample(self.runner, shard.weight_bytes, force=True)
        return worker_pb2.ShardInfo(
            spec=spec,
            model_type=shard.model_type,
            weight_bytes=shard.weight_bytes,
            active_memory_bytes=mx.get_active_memory(),
            load_seconds=shard.load_seconds,
            forkable=shard.forkable,
        )

    async def LoadShard(self, request: worker_pb2.LoadShardRequest, context: Any):
        spec = request.spec
        async with self._load_lock:
            self.shard_info = None
            yield worker_pb2.LoadProgress(phase="loading", fraction=0.0)
            try:
                info = await self.mlx.run(self._load, spec)
            except (ShardError, OSError, ValueError) as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.config.name}: {e}")
            self.shard_info = info
            await self._close_channels()
            log.info(
                "loaded %s layers [%d, %d) in %.2fs (%d bytes)",
                spec.model_id, spec.layer_start, spec.layer_end, info.load_seconds,
                info.weight_bytes,
            )
            yield worker_pb2.LoadProgress(phase="ready", fraction=1.0, shard=info)

    # -- Forward ----------------------------------------------------------------------------
    def _error(self, step_id: int, err: Exception) -> worker_pb2.StageResult:
        spec = self.shard_info.spec
        return worker_pb2.StageResult(
            step_id=step_id,
            error=f"stage {spec.stage_index} ({self.config.name}, layers "
            f"[{spec.layer_start}, {spec.layer_end})): {err}",
        )

    async def _downstream(self, spec: worker_pb2.ShardSpec) -> Any:
        channel = self._channels.get(spec.next_address)
        if channel is None:
            channel = auth.worker_channel(
                spec.next_address, self.config.secret,
                protos.channel_options(spec.max_message_bytes or protos.DEFAULT_MAX_MESSAGE_BYTES))
            self._channels[spec.next_address] = channel
        stub = worker_pb2_grpc.WorkerStub(channel)
        return stub.Forward(metadata=((PLAN_METADATA_KEY, spec.plan_id),))

    async def _close_channels(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def Forward(self, request_iterator: Any, context: Any):
        if self.runner is None or self.shard_info is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        spec = self.shard_info.spec
        plan = dict(context.invocation_metadata() or ()).get(PLAN_METADATA_KEY, "")
        if plan != spec.plan_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stream is for plan {plan!r}, this worker serves plan {spec.plan_id!r}",
            )
        runner = self.runner
        results: asyncio.Queue[worker_pb2.StageResult | BaseException | None] = asyncio.Queue()
        downstream = await self._downstream(spec) if spec.next_address else None
        tasks = [asyncio.create_task(self._pump(request_iterator, runner, downstream, results))]
        if downstream is not None:
            tasks.append(asyncio.create_task(self._relay(downstream, results, spec)))
        try:
            while True:
                item = await results.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if downstream is not None:
                downstream.cancel()

    async def _pump(self, requests: Any, runner: StageRunner, downstream: Any,
                    results: asyncio.Queue) -> None:
        """Run each incoming step in order and pass it on (or back, from the last stage)."""
        try:
            async for msg in requests:
                t0 = time.perf_counter()
                try:
                    out: StepOutput = await self.mlx.run(self._step, runner, msg)
                except (StepError, ValueError) as e:
                    await results.put(self._error(msg.step_id, e))
                    continue
                log.debug("step %d in %.2f ms", msg.step_id, (time.perf_counter() - t0) * 1e3)
                if downstream is not None:
                    t1 = time.perf_counter()
                    await downstream.write(out.forward)
                    if msg.seqs:
                        self.metrics.transfer.observe(time.perf_counter() - t1)
                elif msg.seqs:
                    await results.put(worker_pb2.StageResult(step_id=msg.step_id,
                                                             outputs=out.outputs))
            if downstream is not None:
                await downstream.done_writing()
            else:
                await results.put(None)
        except grpc.aio.AioRpcError as e:
            await results.put(ConnectionError(f"next stage {self._next()}: {e.details()}"))
        except asyncio.CancelledError:
            raise

    def _step(self, runner: StageRunner, msg: worker_pb2.StageMessage) -> StepOutput:
        """Run one step on the MLX thread and record its time, bytes and memory."""
        t0 = time.perf_counter()
        out = runner.run(msg)
        if msg.seqs:
            self.metrics.step(time.perf_counter() - t0, out.prefill_tokens, hidden_bytes(msg),
                              hidden_bytes(out.forward))
        self.metrics.sample(runner, runner.shard.weight_bytes)
        return out

    async def _relay(self, downstream: Any, results: asyncio.Queue,
                     spec: worker_pb2.ShardSpec) -> None:
        """Pass the next stage's results back up the chain."""
        try:
            async for result in downstream:
                await results.put(result)
            await results.put(None)
        except grpc.aio.AioRpcError as e:
            await results.put(ConnectionError(f"next stage {spec.next_address}: {e.details()}"))

    def _next(self) -> str:
        return self.shard_info.spec.next_address if self.shard_info else ""

    async def close(self) -> None:
        await self._close_channels()
        self.mlx.close()


async def serve(config: WorkerConfig, host: str, port: int,
                ready: Any = None, metrics: WorkerMetrics | None = None) -> None:
    """Run the worker's gRPC server until cancelled; `ready(port)` is called once it listens."""
    service = WorkerService(config, metrics)
    interceptors = [service.metrics.interceptor]  # first: refused calls are counted too
    if config.secret:
        interceptors.append(auth.worker_auth(config.secret))
    server = grpc.aio.server(options=protos.channel_options(), interceptors=interceptors)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    bound = protos.listen(server, host, port)
    await server.start()
    log.info("worker %s (%s) listening on %s:%d", config.name, config.node_id, host, bound)
    if ready is not None:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=1.0)
        await service.close()
