"""The worker's gRPC service: describe itself, load a shard, run and forward pipeline steps."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx
from google.protobuf.message import DecodeError

import protos
from protos import auth, tls, worker_pb2, worker_pb2_grpc
from protos.health import Health
from protos.tensorfiles import parts
from protos.undecodable import RefuseUndecodable
from worker import link
from worker.backend import Hardware, wire_memory
from worker.cache import ShardCache
from worker.files import ShardFiles
from worker.forward import ForwardStream
from worker.loop import Loops, follow
from worker.metrics import StepParts, WorkerMetrics, hidden_bytes, step_kind
from worker.mlx_thread import MLXThread, StepTimes
from worker.shard import ShardError, load_shard
from worker.stage import StageRunner, StepOutput

log = logging.getLogger("shardline.worker")

PLAN_METADATA_KEY = "x-shardline-plan"
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


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
    cache_dir: Path | None = None  # shards received are kept under cache_dir/weights/<name>
    tls: Any = None  # protos.tls.TLS: mutual TLS with the coordinator and the next stage

    def weights_dir(self) -> Path:
        """Where this worker keeps received shards (worker/cache.py)."""
        from protos import default_cache_dir

        return (self.cache_dir or default_cache_dir()) / "weights" / _safe(self.name)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "worker"


@dataclass
class Loaded:
    """A shard loaded for one plan and the runner serving it."""

    runner: StageRunner
    info: worker_pb2.ShardInfo

    @property
    def spec(self) -> worker_pb2.ShardSpec:
        return self.info.spec


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one shard at a time; a new LoadShard replaces the previous one."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None,
                 health: Health | None = None, host: str = "127.0.0.1") -> None:
        self.config = config
        self.health = health  # its `stopped` is Info's `stopping`
        self.metrics = metrics or WorkerMetrics(config.hardware.memory_bytes)
        self.mlx = MLXThread()
        self.parts = StepParts(self.metrics)
        self.mlx.on_prepared = self.parts.prepared
        self._sinks: dict[str, asyncio.Queue] = {}  # plan id -> its open Results stream
        self._loops = Loops()  # stage 0s following this last stage's tokens (worker/loop.py)
        self.runner: StageRunner | None = None
        self.shard_info: worker_pb2.ShardInfo | None = None
        # the plan before the latest, still serving while the coordinator switches over (a
        # Forward of the latest plan, or the next load, ends it)
        self._previous: Loaded | None = None
        self._streams: dict[str, int] = {}  # plan id -> its open Forward streams
        self._load_lock = asyncio.Lock()
        self.files = ShardFiles(config, ShardCache(config.weights_dir()), self.metrics)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._links = link.LinkListener(host, config.secret)  # direct links (worker/link.py)

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
            device=hw.device,
            lanes=hw.lanes,
            stopping=self.health is not None and self.health.stopped,
        )

    # -- Want / Put: shard files into the cache (worker/files.py) ------------------------
    async def Want(self, request: worker_pb2.ShardFiles, context: Any) -> worker_pb2.FileNeeds:
        return await self.files.want(request, context)

    async def Put(self, request_iterator: Any, context: Any):
        async for ack in self.files.put(request_iterator, context):
            yield ack

    # -- LoadShard --------------------------------------------------------------------------
    def _model_path(self, spec: worker_pb2.ShardSpec) -> Path:
        if spec.files:
            local = self.files.local_has(spec.model_id, spec.files)
            if local is not None:
                return local
            return self.files.cache.assemble(spec.model_id, (spec.layer_start, spec.layer_end),
                                       spec.files)
        return self.files.local_dir(spec.model_id) or Path(spec.model_path)

    def _drop_previous(self) -> None:
        if self._previous is not None:
            self._previous.runner.close()
            self._previous = None

    def _load(self, spec: worker_pb2.ShardSpec, old: StageRunner | None,
              old_spec: worker_pb2.ShardSpec | None, keep: bool
              ) -> tuple[StageRunner, worker_pb2.ShardInfo, int]:
        """On the MLX thread: load the shard of `spec`, taking the layers `old` holds from it.
        Without `keep`, `old` stops at once and lets go of what the new shard does not keep."""
        reuse = old.shard if old is not None else None
        same = _same_parts(old_spec, spec) if reuse is not None else frozenset()
        if old is not None and not keep:
            old.close()
            if reuse is not None:
                reuse.keep_only(spec.layer_start, spec.layer_end)
        gc.collect()
        mx.clear_cache()
        shard = load_shard(self._model_path(spec), spec.layer_start, spec.layer_end, reuse, same)
        if shard.num_layers != spec.num_layers:
            raise ShardError(
                f"model {spec.model_id} has {shard.num_layers} layers, plan says "
                f"{spec.num_layers}"
            )
        kept = sum(1 for i in range(spec.layer_start, spec.layer_end) if f"layers.{i}" in same
                   and reuse is not None and reuse.start <= i < reuse.end)
        reuse = None
        wire_memory(shard.weight_bytes)
        runner = StageRunner(shard)
        self.metrics.sample(runner, shard.weight_bytes, force=True)
        info = worker_pb2.ShardInfo(
            spec=spec,
            model_type=shard.model_type,
            weight_bytes=shard.weight_bytes,
            active_memory_bytes=mx.get_active_memory(),
            load_seconds=shard.load_seconds,
            forkable=shard.forkable,
        )
        return runner, info, kept

    async def LoadShard(self, request: worker_pb2.LoadShardRequest, context: Any):
        spec = request.spec
        async with self._load_lock:
            yield worker_pb2.LoadProgress(phase="loading", fraction=0.0)
            old = self.runner
            old_spec = self.shard_info.spec if self.shard_info is not None else None
            keep = request.keep_serving and old is not None
            self._drop_previous()
            if not keep:  # the plan served now is over
                self.runner, self.shard_info = None, None
            try:
                runner, info, kept = await self.mlx.run(self._load, spec, old, old_spec, keep)
            except (ShardError, OSError, ValueError) as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.config.name}: {e}")
            if keep and self.shard_info is not None:
                self._previous = Loaded(old, self.shard_info)
            self.runner, self.shard_info = runner, info
            log.info(
                "loaded %s layers [%d, %d) in %.2fs (%d bytes, %d layers kept from before)",
                spec.model_id, spec.layer_start, spec.layer_end, info.load_seconds,
                info.weight_bytes, kept,
            )
            yield worker_pb2.LoadProgress(phase="ready", fraction=1.0, shard=info,
                                          layers_kept=kept)

    def _plan(self, plan: str) -> Loaded | None:
        """The shard serving `plan`: the latest; or the one before while the switch is on (a
        stream of the latest plan ends the one before)."""
        if self.runner is not None and self.shard_info is not None \
                and plan == self.shard_info.spec.plan_id:
            return Loaded(self.runner, self.shard_info)
        if self._previous is not None and plan == self._previous.spec.plan_id:
            return self._previous
        return None

    # -- Forward ----------------------------------------------------------------------------
    def error_text(self, spec: worker_pb2.ShardSpec, err: BaseException) -> str:
        """A step's error, naming this stage."""
        return (f"stage {spec.stage_index} ({self.config.name}, layers "
                f"[{spec.layer_start}, {spec.layer_end})): {err}")

    def _channel(self, address: str, spec: worker_pb2.ShardSpec) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = auth.worker_channel(
                address, self.config.secret,
                protos.channel_options(spec.max_message_bytes or protos.DEFAULT_MAX_MESSAGE_BYTES))
            self._channels[address] = channel
        return channel

    async def _downstream(self, spec: worker_pb2.ShardSpec, stream: ForwardStream
                          ) -> tuple[Any, link.LinkWriter | None]:
        """The Forward call to the next stage (None: this is the last) and the direct link
        it gave (None: the steps go on the call); `stream` holds the call at once (closing
        it cancels the call)."""
        if not spec.next_address:
            return None, None
        stub = worker_pb2_grpc.WorkerStub(self._channel(spec.next_address, spec))
        ask = self.config.tls is None and link.enabled()
        metadata = ((PLAN_METADATA_KEY, spec.plan_id),) + (((link.LINK_KEY, "1"),) if ask else ())
        stream.downstream = call = stub.Forward(metadata=metadata)
        sock = await link.connect(call, spec.next_address, self.config.secret) if ask \
            else None
        return call, link.LinkWriter(sock) if sock is not None else None

    def followers(self, plan_id: str) -> tuple[link.LinkWriter, ...]:
        """The direct links of the stages following `plan_id`'s tokens (any thread)."""
        return self._loops.writers(plan_id)

    def deliver(self, plan_id: str, result: worker_pb2.StageResult, back: asyncio.Queue
                ) -> None:
        """The last stage's `result`: to the stage 0s following its tokens first (they start
        on it), then to the plan's Results stream, or `back` on the Forward stream."""
        self._loops.send(plan_id, result)
        (self._sinks.get(plan_id) or back).put_nowait(result)

    async def _close_channels(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def Forward(self, request_iterator: Any, context: Any):
        metadata = dict(context.invocation_metadata() or ())
        loaded = await self._serving(context, metadata.get(PLAN_METADATA_KEY, ""))
        spec = loaded.spec
        self._streams[spec.plan_id] = self._streams.get(spec.plan_id, 0) + 1
        stream = ForwardStream(self, loaded)
        tasks: list[asyncio.Task] = []
        try:
            stream.downstream, stream.link_out = await self._downstream(spec, stream)
            if metadata.get(link.LINK_KEY) == "1":  # the previous stage asks for a direct link
                stream.link_in = await self._links.offer(context, self.config.tls is None)
            tasks.append(asyncio.create_task(stream.pump(request_iterator)))
            if stream.downstream is not None:
                tasks.append(asyncio.create_task(stream.watch()))
            if spec.last_address and stream.downstream is not None:
                # stage 0: the token's short way round; a middle stage, once proposals come:
                # the verdicts on them (both worker/loop.py)
                tasks.append(asyncio.create_task(self._follow(spec, loaded, stream)))
            while True:
                item = await stream.back.get()
                if item is None:
                    return
                if isinstance(item, DecodeError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"a message does not parse: {item}")
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                yield item
                self._verdict(loaded, item)
                if stream.back.empty():
                    self.mlx.idle()  # written: the MLX thread may build ahead
        finally:
            for task in tasks:
                task.cancel()
            stream.close()
            self._release_left(loaded, stream.started)
            self._streams[spec.plan_id] -= 1
            if not self._streams[spec.plan_id]:
                del self._streams[spec.plan_id]
                if self._previous is not None and self._previous.spec.plan_id == spec.plan_id:
                    self._drop_previous()  # the coordinator has drained the plan before

    async def _follow(self, spec: worker_pb2.ShardSpec, loaded: Loaded,
                      stream: ForwardStream) -> None:
        if spec.stage_index != 0:
            await stream.checks.wait()
        await follow(self._channel(spec.last_address, spec), spec, self.mlx, loaded.runner,
                     self.config.secret, self.config.tls is None and link.enabled(),
                     stream.ahead if spec.stage_index == 0 else None)

    def _verdict(self, loaded: Loaded, result: Any) -> None:
        """A result of this last stage has left: its checks of proposals settle here too,
        and the next is built ahead (worker/check_ahead.py), off the token's path."""
        if isinstance(result, worker_pb2.StageResult) and result.outputs and \
                not result.error and loaded.runner.awaits_verdict(result):
            self.mlx.early(loaded.runner, result)

    async def Results(self, request: worker_pb2.ResultsRequest, context: Any):
        loaded = await self._serving(context, request.plan_id)
        if loaded.spec.next_address:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "only the last stage has results")
        if request.loop:
            offered = None
            if dict(context.invocation_metadata() or ()).get(link.LINK_KEY) == "1":
                offered = await self._links.offer(context, self.config.tls is None)
            async for result in self._loops.serve(request.plan_id, offered):
                yield result
            return
        sink: asyncio.Queue[worker_pb2.StageResult] = asyncio.Queue()
        self._sinks[request.plan_id] = sink
        try:
            yield worker_pb2.StageResult()  # attached: results of this plan come here now
            while True:
                result = await sink.get()
                yield result
                self._verdict(loaded, result)
                if sink.empty():
                    self.mlx.idle()  # written: the MLX thread may build ahead
        finally:
            if self._sinks.get(request.plan_id) is sink:
                del self._sinks[request.plan_id]

    async def _serving(self, context: Any, plan: str) -> Loaded:
        """The shard of `plan`; the call ends FAILED_PRECONDITION when this worker serves
        another plan or none."""
        if self.runner is None or self.shard_info is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        loaded = self._plan(plan)
        if loaded is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stream is for plan {plan!r}, this worker serves plan "
                f"{self.shard_info.spec.plan_id!r}",
            )
        return loaded

    def _release_left(self, loaded: Loaded, started: list[str]) -> None:
        """Free the sequences a Forward stream started and left when it ends: no later step
        can reach them, so a client that goes (or a hostile one) leaves no caches behind."""
        if not started or loaded.runner.shard is None:
            return
        try:
            future, _ = self.mlx.step(loaded.runner, worker_pb2.StageMessage(
                release=started), time.perf_counter())
        except RuntimeError:  # the MLX thread is closed: shutting down
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def record(self, msg: worker_pb2.StageMessage, out: StepOutput, times: StepTimes) -> None:
        """On the MLX thread, after a step: its time, bytes and memory in the metrics."""
        if msg.seqs and not out.confirmed:
            # the step's output was built from the incoming hidden state in place: its bytes
            # were counted before it ran
            self.metrics.step(times.host + times.device + times.serialise, out.prefill_tokens,
                              times.bytes_in, hidden_bytes(out.forward))
            self.parts.computed(times, step_kind(msg, out.prefill_tokens))
            if msg.ahead and times.sent and self.runner and self.runner.shard.is_first:
                self.parts.sent_ahead(times)  # (it went on the link, not through the loop)
        runner = self.runner
        if runner is not None:
            self.metrics.sample(runner, runner.shard.weight_bytes)
            self.metrics.guesses(runner)

    async def close(self) -> None:
        self._links.close()
        await self._close_channels()
        self.mlx.close()


async def serve(config: WorkerConfig, host: str, port: int,
                ready: Any = None, metrics: WorkerMetrics | None = None,
                health: Health | None = None) -> None:
    """Run the worker's gRPC server until cancelled; `ready(port)` is called once it listens.
    grpc.health.v1 (`health`) says SERVING from then on, NOT_SERVING once it stops."""
    health = health or Health((WORKER_SERVICE,))
    service = WorkerService(config, metrics, health, host or "0.0.0.0")
    interceptors = [service.metrics.interceptor]  # first: refused calls are counted too
    if config.secret:
        interceptors.append(auth.worker_auth(config.secret))
    interceptors.append(RefuseUndecodable())  # after auth: refused first, parsed or not
    server = grpc.aio.server(options=protos.channel_options(), interceptors=interceptors)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health.add_to(server)
    tls.use(config.tls)  # the stream to the next stage presents this worker's certificate
    credentials = config.tls.server_credentials(require_client_cert=True) if config.tls \
        else None
    bound = protos.listen(server, host, port, credentials)
    await server.start()
    await health.set(True)
    log.info("worker %s (%s) listening on %s:%d", config.name, config.node_id, host, bound)
    if ready is not None:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        await health.stopping()
        await server.stop(grace=1.0)
        await service.close()


def _same_parts(before: worker_pb2.ShardSpec | None, after: worker_pb2.ShardSpec
                ) -> frozenset[str]:
    """The parts of `after` (layers, embedding, norm, head) made of the very files `before`
    was loaded from: those a new shard takes from the old one in memory."""
    if before is None or not before.files or not after.files:
        return frozenset()
    old, new = parts(before.files), parts(after.files)
    return frozenset(k for k, hashes in new.items() if old.get(k) == hashes)
