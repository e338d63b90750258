"""The cluster: reach the workers, plan the split, load the shards, open the pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_bytes
from typing import Any

import grpc

import protos
from coordinator.cluster.modelinfo import ModelInfo
from coordinator.cluster.planner import NodeCapacity, Plan, plan
from coordinator.cluster.progress import TransferBars
from coordinator.cluster.shipping import ShipError, Shipper, Transfer, describe
from coordinator.serving.pipeline import Pipeline, PipelineError
from protos import auth, default_cache_dir, inference_pb2, worker_pb2, worker_pb2_grpc
from protos.tensorfiles import TensorFileError
from protos.units import format_size

log = logging.getLogger("shardline.cluster")


# A plan worker's status (Worker.status) while the cluster runs it; coordinator.cluster.discovery
# names the states membership adds (left, unreachable, restarted) and those of workers not in
# the plan.
READY, LOADING, SERVING, FAILED = "ready", "loading", "serving", "failed"
WORKER_STATES = (READY, LOADING, SERVING, FAILED)


class ClusterError(RuntimeError):
    """The cluster cannot serve: a worker is unreachable, refused its shard, or the plan failed."""


@dataclass
class Worker:
    """A worker as the coordinator sees it."""

    address: str
    info: worker_pb2.WorkerInfo
    channel: grpc.aio.Channel
    shard: worker_pb2.ShardInfo | None = None
    status: str = READY
    transfer: Transfer | None = None  # its shard's last (or current) trip here
    layers_kept: int = 0  # layers its last load kept in memory from the shard before

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.channel)

    @property
    def label(self) -> str:
        return f"{self.info.name} ({self.address})"


class WorkerRefused(ClusterError):
    """A worker and this coordinator do not share the cluster secret (one of them refused)."""


class WireMismatch(ClusterError):
    """A worker of another wire version."""


async def open_worker(address: str, timeout: float = 5.0, secret: bytes | None = None
                      ) -> Worker:
    """A channel to `address` (calls signed with `secret`) and the worker's Info, any wire
    version. With a secret the worker must prove it knows it too (protos/auth.py).

    ClusterError when it does not answer in time; WorkerRefused when the secrets disagree."""
    channel = auth.worker_channel(address, secret, protos.channel_options())
    challenge = token_bytes(16) if secret else b""
    try:
        info = await worker_pb2_grpc.WorkerStub(channel).Info(
            worker_pb2.InfoRequest(challenge=challenge), timeout=timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as e:
        await channel.close()
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise WorkerRefused(f"worker at {address} refused this coordinator: "
                                f"{e.details()}") from None
        reason = "no answer" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else e.details()
        raise ClusterError(f"cannot reach worker at {address}: {reason}") from None
    if secret and not auth.proves(secret, challenge, info.proof):
        await channel.close()
        raise WorkerRefused(f"worker {info.name} at {address} cannot prove the cluster secret "
                            "(start it with the same --secret-file)")
    return Worker(address=address, info=info, channel=channel)


async def dial(address: str, timeout: float = 3.0, secret: bytes | None = None,
               refused: list[str] | None = None, stopping: list[str] | None = None
               ) -> Worker | None:
    """Connect and ask Info (any wire version: the table judges); None if it does not answer,
    says it is stopping (its address appended to `stopping`), or the cluster secrets disagree
    (why appended to `refused`)."""
    try:
        worker = await open_worker(address, timeout, secret)
    except WorkerRefused as e:
        if refused is not None:
            refused.append(str(e))
        return None
    except (ClusterError, ValueError):
        return None
    if worker.info.stopping:  # in its shutdown grace: it answers, and is gone in a moment
        await worker.channel.close()
        if stopping is not None:
            stopping.append(address)
        return None
    return worker


async def connect(address: str, timeout: float = 5.0, secret: bytes | None = None) -> Worker:
    """Ask the worker at `address` what it is; ClusterError if it does not answer in time,
    refuses our secret, or speaks another wire version."""
    worker = await open_worker(address, timeout, secret)
    if worker.info.api != protos.WIRE_VERSION:
        await worker.channel.close()
        raise WireMismatch(
            f"worker {worker.info.name} at {address} speaks wire version {worker.info.api}, "
            f"this coordinator {protos.WIRE_VERSION}"
        )
    return worker


async def connect_all(addresses: Sequence[str], secret: bytes | None = None) -> list[Worker]:
    """Reach every address in parallel; ClusterError naming each worker that did not answer
    (the channels that did open are closed)."""
    return await wait_all(addresses, secret)


async def wait_all(addresses: Sequence[str], secret: bytes | None = None, wait: float = 0.0,
                   progress: Callable[[str], None] | None = None) -> list[Worker]:
    """`connect_all`, but a worker that does not answer yet is tried again (every 0.5 s, then
    less often, up to 5 s apart) for up to `wait` seconds: a service manager may start the
    coordinator before its workers listen. A worker that refuses the secret or speaks another
    wire version fails at once."""
    deadline = time.monotonic() + wait
    told = False

    async def one(address: str) -> Worker:
        nonlocal told
        pause, timeout = 0.5, 5.0 if wait <= 0 else max(0.5, min(5.0, wait / 2))
        while True:
            try:
                return await connect(address, timeout=timeout, secret=secret)
            except (WorkerRefused, WireMismatch):
                raise
            except ClusterError as e:
                if deadline - time.monotonic() <= 0:
                    raise
                if progress is not None and not told:
                    told = True
                    progress(f"waiting up to {wait:g}s for workers that do not answer yet "
                             f"({e}; --worker-wait)")
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 5.0)
            timeout = max(0.5, min(5.0, deadline - time.monotonic()))

    outcomes = await asyncio.gather(*(one(a) for a in addresses), return_exceptions=True)
    errors = [str(o) for o in outcomes if isinstance(o, BaseException)]
    if errors:
        for o in outcomes:
            if isinstance(o, Worker):
                await o.channel.close()
        raise ClusterError("; ".join(errors))
    if told and progress is not None:
        progress(f"all {len(addresses)} worker(s) answered")
    return list(outcomes)


def lanes(infos: Sequence[worker_pb2.WorkerInfo]) -> int:
    """Steps these workers compute at once: per device they share, as many as it computes
    together (`WorkerInfo.lanes`, at most its workers); a worker that names no device has its
    own. Several workers on one GPU take turns, so the microbatches that keep separate machines
    busy would only read each stage's weights once per microbatch there."""
    shared: dict[str, tuple[int, int]] = {}  # device -> (its lanes, its workers)
    for i, info in enumerate(infos):
        key = info.device or f"#{i}"
        workers = shared.get(key, (0, 0))[1] + 1
        shared[key] = (max(1, info.lanes), workers)
    return max(1, sum(min(n, workers) for n, workers in shared.values()))


@dataclass
class Cluster:
    """Workers, the plan over them and the pipeline through them, for one model."""

    model: ModelInfo
    workers: list[Worker]
    partition: str = "memory"
    context: int | None = None
    max_sequences: int = 4
    prefix_cache_tokens: int = 0  # KV the prefix cache may keep, reserved by the plan
    plan: Plan | None = None
    pipeline: Pipeline | None = None
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # rows of workers seen but not in the plan (set by coordinator.cluster.membership)
    extra_states: Callable[[], list[inference_pb2.WorkerState]] | None = None
    # told when the pipeline breaks (coordinator.cluster.membership re-plans over the live workers)
    on_broken: Callable[[str], None] | None = None
    recovering: bool = False  # a re-plan after a failure is under way: requests wait for it
    secret: bytes | None = field(default=None, repr=False)  # signs every call to a worker
    cache_dir: Path | None = None  # the model's hash index is kept under it
    metrics: Any = None  # CoordinatorMetrics: bytes shipped to each worker
    _shipper: Shipper | None = field(default=None, repr=False)
    # pipelines a re-plan replaced whose requests still finish on them (closed by the last)
    _draining: list[Pipeline] = field(default_factory=list, repr=False)
    _lanes: tuple[Plan | None, int] | None = field(default=None, repr=False)  # (plan, lanes)

    def make_plan(self) -> Plan:
        nodes = [
            NodeCapacity(w.info.name, w.info.memory_bytes, w.info.bandwidth_gbps or None)
            for w in self.workers
        ]
        self.plan = plan(self.model, nodes, partition=self.partition, context=self.context,
                         max_sequences=self.max_sequences,
                         prefix_cache_tokens=self.prefix_cache_tokens)
        return self.plan

    def shipper(self) -> Shipper:
        """The model's shard files (hashed once, the index under the cache dir)."""
        if self._shipper is None or self._shipper.model is not self.model:
            self._shipper = Shipper(self.model, (self.cache_dir or default_cache_dir()) / "hashes")
        return self._shipper

    def _can_keep_serving(self, stages: Sequence[Any]) -> bool:
        """Every worker of the new plan can hold its old and its new layers at once, so the
        old pipeline serves while the new shards load."""
        for stage, worker in zip(stages, self.workers, strict=False):
            old = worker.shard.spec if worker.shard is not None else None
            size = self.model.stage_bytes(stage.layer_start, stage.layer_end)
            if old is not None:
                size += sum(self.model.layer_bytes[i] for i in range(old.layer_start,
                            old.layer_end) if not stage.layer_start <= i < stage.layer_end)
            if size > worker.info.memory_bytes:
                return False
        return True

    async def load(self, progress: Callable[[str], None] | None = None, *,
                   keep_serving: bool = False,
                   switched: Callable[[], None] | None = None) -> None:
        """Ship every stage's shard and load it (in parallel), then open the pipeline into
        stage 0. With `keep_serving` (a re-plan while the pipeline serves) the old pipeline
        goes on serving until every new shard is loaded, where the workers can hold both;
        its requests then resume on the new one. `switched()` runs as the new one takes
        over."""
        if self.plan is None:
            self.make_plan()
        stages = self.plan.stages
        # A worker keeps one plan besides the one it loads: the shards of a plan still draining
        # from an earlier re-plan go now, so its requests stop and resume like the rest (else
        # their next step would meet a replaced shard, a stage error: lost).
        for draining in self._draining:
            if draining.users and not draining.broken:
                self._retire(draining, "re-planning again")
        self._draining = []
        old = self.pipeline if self.pipeline is not None and not self.pipeline.broken else None
        keep = keep_serving and old is not None and self._can_keep_serving(stages)
        if old is not None and not keep:
            self._retire(old, "re-planning")
        plan_id = uuid.uuid4().hex[:12]
        shipper = self.shipper()
        tell = progress or (lambda _m: None)
        try:
            await shipper.tensors(progress)
        except (TensorFileError, OSError) as e:
            raise ClusterError(f"cannot read the model's weights: {e}") from None
        bars = TransferBars(enabled=progress is not None)

        async def load_one(i: int, worker: Worker) -> None:
            stage = stages[i]
            start, end = stage.layer_start, stage.layer_end
            worker.status = LOADING
            try:
                files = await shipper.files(start, end)
                worker.transfer = transfer = Transfer(worker.info.name)
                counter = self.metrics.shard_transfer.labels(worker.info.name) \
                    if self.metrics is not None else None

                def sent(n: int) -> None:
                    bars.advance(transfer, n)
                    if counter is not None:
                        counter.inc(n)

                await shipper.ship(worker.stub, worker.info.name, start, end, files,
                                   transfer, sent)
                bars.finish(transfer)
                tell(f"  {describe(transfer)}")
            except (ShipError, TensorFileError, OSError) as e:
                worker.status = FAILED
                raise ClusterError(f"worker {worker.label} could not get its shard: {e}") from None
            spec = worker_pb2.ShardSpec(
                model_id=self.model.model_id,
                layer_start=start,
                layer_end=end,
                num_layers=self.model.num_layers,
                stage_index=i,
                num_stages=len(stages),
                next_address=self.workers[i + 1].address if i + 1 < len(stages) else "",
                last_address=self.workers[len(stages) - 1].address
                if i + 1 < len(stages) else "",
                max_message_bytes=protos.DEFAULT_MAX_MESSAGE_BYTES,
                plan_id=plan_id,
                files=[worker_pb2.ShardFile(name=f.name, sha256=f.sha256, size=f.size,
                                            tensor=f.tensor) for f in files],
            )
            kept = 0
            try:
                async for step in worker.stub.LoadShard(
                        worker_pb2.LoadShardRequest(spec=spec, keep_serving=keep)):
                    if step.HasField("shard"):
                        worker.shard, kept = step.shard, step.layers_kept
            except grpc.aio.AioRpcError as e:
                worker.status = FAILED
                raise ClusterError(f"worker {worker.label} could not load its shard: "
                                   f"{e.details()}") from None
            worker.status, worker.layers_kept = SERVING, kept
            tell(f"  {worker.info.name}: layers [{start}, {end}) loaded in "
                 f"{worker.shard.load_seconds:.2f}s, {format_size(worker.shard.weight_bytes)}"
                 + (f" ({kept} kept in memory)" if kept else ""))

        try:
            await asyncio.gather(*(load_one(i, w)
                                   for i, w in enumerate(self.workers[: len(stages)])))
        except ClusterError:
            if old is not None:
                self._retire(old, "re-plan failed")  # its workers may hold other shards now
            raise
        finally:
            bars.close()
        fresh = Pipeline(self.workers[0].address, plan_id, secret=self.secret,
                         last_address=self.workers[len(stages) - 1].address,
                         ahead=len(stages) > 1 and all(  # (sent ahead: caches trim)
                             w.shard.forkable for w in self.workers[: len(stages)]))
        try:
            await fresh.open()
        except PipelineError as e:
            if old is not None:  # its workers hold the new shards now
                self._retire(old, f"re-plan failed: {e}")
            if self.pipeline is not None:
                await self.pipeline.close()
            raise ClusterError(str(e)) from None
        fresh.on_broken = self.on_broken
        before, self.plan_id, self.pipeline = self.pipeline, plan_id, fresh
        if switched is not None:
            switched()
        if before is not None and before is old and keep and not old.broken:
            # draining: the requests running on it finish there (new ones start on the new
            # plan; the workers serve both until it closes); the last one closes it
            old.on_broken = None
            old.retired = True
            if not old.users:
                await old.close()
            else:
                self._draining.append(old)
        elif before is not None:
            await before.close()

    def _retire(self, pipeline: Pipeline, reason: str) -> None:
        """Stop `pipeline` without calling it a failure: its requests wait for the next one
        (`recovering`) and resume there."""
        pipeline.on_broken = None
        self.recovering = True
        pipeline.fail(reason)

    async def wait_serving(self, timeout: float) -> Pipeline | None:
        """The pipeline once it can serve: now, or after the recovery under way (up to
        `timeout` seconds); None when it cannot."""
        deadline = time.monotonic() + timeout
        while True:
            pipeline = self.pipeline
            if pipeline is not None and not pipeline.broken:
                return pipeline
            if not self.recovering or time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    @property
    def lanes(self) -> int:
        """Steps the plan's workers compute at once (`lanes`): the decode microbatches worth
        sending together (counted once per plan: the batcher asks at every step)."""
        if self._lanes is None or self._lanes[0] is not self.plan:
            stages = len(self.plan.stages) if self.plan is not None else 0
            self._lanes = (self.plan, lanes([w.info for w in self.workers[:stages]]))
        return self._lanes[1]

    @property
    def forkable(self) -> bool:
        """Every loaded shard can fork caches, so the prefix cache can be used."""
        return all(w.shard is not None and w.shard.forkable for w in self.workers)

    def state(self) -> inference_pb2.ClusterState:
        """The public ClusterState: each worker with its layers and status."""
        out = inference_pb2.ClusterState(model=self.model.model_id, partition=self.partition)
        for w in self.workers:
            spec = w.shard.spec if w.shard else None
            out.workers.append(
                inference_pb2.WorkerState(
                    id=w.info.id,
                    name=w.info.name,
                    address=w.address,
                    memory_bytes=w.info.memory_bytes,
                    backend=w.info.backend,
                    layer_start=spec.layer_start if spec else 0,
                    layer_end=spec.layer_end if spec else 0,
                    status=w.status,
                    shard_bytes=w.transfer.total if w.transfer else 0,
                    shard_bytes_sent=w.transfer.sent if w.transfer else 0,
                )
            )
        if self.extra_states is not None:
            out.workers.extend(self.extra_states())
        return out

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.close()
        for w in self.workers:
            await w.channel.close()
