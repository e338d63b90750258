"""The worker's side of shard shipping: which files it lacks (Want) and receiving them (Put)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from protos import worker_pb2
from protos.tensorfiles import HashIndex, TensorFileError, model_tensors
from protos.undecodable import parsed
from protos.units import format_size
from worker.cache import CacheFull, ShardCache

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics
    from worker.server import WorkerConfig

log = logging.getLogger("shardline.worker")


class ShardFiles:
    """A worker's shard cache and its own models directory, as the coordinator sees them."""

    def __init__(self, config: WorkerConfig, cache: ShardCache, metrics: WorkerMetrics) -> None:
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self._local_index = HashIndex(cache.root / "hashes")

    def local_dir(self, model_id: str) -> Path | None:
        """The model's directory under --models-dir, if it has one."""
        if self.config.models_dir and model_id:
            candidate = self.config.models_dir / model_id
            if (candidate / "config.json").is_file():
                return candidate
        return None

    def local_has(self, model_id: str, files: Any) -> Path | None:
        """This worker's own copy of the model (--models-dir) when it holds every one of
        `files`' tensors with the same bytes (hashed once, remembered in the cache)."""
        local = self.local_dir(model_id)
        if local is None:
            return None
        try:
            mine = {t.sha256 for t in model_tensors(local, self._local_index).values()}
        except (TensorFileError, OSError) as e:
            log.warning("not using %s: %s", local, e)
            return None
        wanted = {f.sha256 for f in files if f.name.endswith(".safetensors")}
        if not wanted <= mine:
            log.info("%s differs from the coordinator's model: receiving the shard", local)
            return None
        return local

    async def want(self, request: worker_pb2.ShardFiles, context: Any) -> worker_pb2.FileNeeds:
        """Want: nothing when the worker's own copy matches, else what it lacks."""
        where = f"layers [{request.layer_start}, {request.layer_end}) of {request.model_id}"
        try:
            if await asyncio.to_thread(self.local_has, request.model_id, request.files):
                return worker_pb2.FileNeeds(local=True)
            needs = await asyncio.to_thread(self.cache.needs, request.files)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.config.name}: {e}")
        except CacheFull as e:
            missing, free = e.args
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.config.name}: {where} need {format_size(missing)} more on disk, "
                f"{self.cache.root} has {format_size(free)} free")
        return worker_pb2.FileNeeds(
            needs=[worker_pb2.FileNeed(sha256=f.sha256, size=f.size, held=held)
                   for f, held in needs],
            free_bytes=self.cache.free_bytes())

    async def put(self, request_iterator: Any, context: Any):
        """Put: each chunk stored and checked, one ChunkAck per chunk."""
        async for chunk in parsed(request_iterator, context):
            try:
                ack = await asyncio.to_thread(self.cache.put, chunk.sha256, chunk.size,
                                              chunk.offset, chunk.data, chunk.chunk_sha256)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.config.name}: {e}")
            except OSError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{self.config.name}: cannot store a shard file: {e}")
            if ack.ok:
                self.metrics.shard_received.inc(len(chunk.data))
            yield worker_pb2.ChunkAck(sha256=chunk.sha256, offset=chunk.offset, ok=ack.ok,
                                      complete=ack.complete, held=ack.held, error=ack.error)
