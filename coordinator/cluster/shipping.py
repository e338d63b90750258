"""Ship each worker exactly its shard: the files of its layers, in checked chunks, resumable.

The coordinator holds the model. For a stage it lists the shard's files (config.json and one
single-tensor file per tensor of its layers, protos/tensorfiles.py), asks the worker which it
lacks (`Worker.Want`: it may hold them in its cache, or the whole model in its --models-dir),
and streams only those (`Worker.Put`), a few chunks in flight: a refused chunk is sent again
from where the worker says it stands. Nothing holds more than the chunks in flight in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.cluster.modelinfo import ModelInfo
from coordinator.cluster.progress import HashBar
from protos import worker_pb2
from protos.tensorfiles import CONFIG_FILES, FileSource, HashIndex, config_file, model_tensors
from protos.units import format_size

log = logging.getLogger("shardline.shipping")

CHUNK_BYTES = 4 << 20
WINDOW = 4  # chunks in flight per stream
# Put streams per transfer, each with its own files: both ends hash and write several files at
# once (one stream keeps about one core busy on each end)
STREAMS = 3
MAX_REFUSALS = 8  # chunk refusals per file before the transfer fails


class ShipError(RuntimeError):
    """A shard could not be sent: the worker refused it, its disk is full, or chunks kept
    failing their checks."""


@dataclass
class Transfer:
    """One worker's shard on its way: what it needs, what has gone, for bars and status."""

    worker: str
    files: int = 0
    total: int = 0  # bytes to send
    sent: int = 0  # bytes accepted so far
    resent: int = 0  # bytes sent again after a refusal
    local: bool = False  # the worker had the model itself
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def rate(self) -> float:
        """Bytes a second so far."""
        return self.sent / max(time.monotonic() - self.started, 1e-6)


class Shipper:
    """The shard files of one model directory, hashed once (index in `index_dir`)."""

    def __init__(self, model: ModelInfo, index_dir: Path | None = None) -> None:
        self.model = model
        self.index = HashIndex(index_dir)
        self._tensors: dict[str, FileSource] | None = None
        self._lock = asyncio.Lock()
        self.chunk_bytes = CHUNK_BYTES
        self.streams = STREAMS
        # tests corrupt a chunk on its way: (file sha256, offset, data) -> data
        self.tamper: Callable[[str, int, bytes], bytes] | None = None

    async def tensors(self, progress: Callable[[str], None] | None = None
                      ) -> dict[str, FileSource]:
        """Every tensor's file; the first call hashes the model (off the event loop)."""
        async with self._lock:
            if self._tensors is None:
                t0 = time.monotonic()
                bar = HashBar(self.model.model_id, self.model.weight_bytes,
                              enabled=progress is not None)
                try:
                    self._tensors = await asyncio.to_thread(model_tensors, self.model.path,
                                                            self.index, bar.advance)
                finally:
                    bar.close()
                if progress is not None and time.monotonic() - t0 > 1.0:
                    progress(f"hashed {self.model.model_id} in {time.monotonic() - t0:.1f}s "
                             "(once: the hashes are kept)")
            return self._tensors

    async def files(self, start: int, end: int) -> list[FileSource]:
        """The files of a stage holding layers [start, end): config files first (the
        tokenizer only for the last stage, which samples)."""
        tensors = await self.tensors()
        names = [n for n in CONFIG_FILES if n != "tokenizer.json" or end == self.model.num_layers]
        configs = [config_file(self.model.path / n) for n in names
                   if (self.model.path / n).is_file()]
        picked = [t for name, t in sorted(tensors.items())
                  if self.model.in_stage(name, start, end)]
        return configs + picked

    async def ship(self, stub: Any, name: str, start: int, end: int, files: list[FileSource],
                   transfer: Transfer, on_bytes: Callable[[int], None] | None = None) -> None:
        """Send worker `name` (its stub) what it lacks of `files`; ShipError when it cannot."""
        request = worker_pb2.ShardFiles(
            model_id=self.model.model_id, layer_start=start, layer_end=end,
            files=[worker_pb2.ShardFile(name=f.name, sha256=f.sha256, size=f.size)
                   for f in files])
        try:
            needs = await stub.Want(request)
        except grpc.aio.AioRpcError as e:
            raise ShipError(e.details()) from None
        by_hash = {f.sha256: f for f in files}
        todo = [(by_hash[n.sha256], n.held) for n in needs.needs if n.sha256 in by_hash]
        transfer.local = needs.local
        transfer.files = len(todo)
        transfer.total = sum(f.size - held for f, held in todo)
        if not todo:
            transfer.done = True
            return
        calls = [stub.Put() for _ in range(min(self.streams, len(todo)))]
        try:
            await asyncio.gather(*(self._stream(call, part, transfer, on_bytes) for call, part
                                   in zip(calls, split(todo, len(calls)), strict=True)))
        except grpc.aio.AioRpcError as e:
            raise ShipError(f"the transfer broke: {e.details()}") from None
        finally:
            for call in calls:
                call.cancel()
        transfer.done = True

    async def _stream(self, call: Any, todo: list[tuple[FileSource, int]], transfer: Transfer,
                      on_bytes: Callable[[int], None] | None) -> None:
        await self._send(call, todo, transfer, on_bytes)
        await call.done_writing()

    def _after(self, files: list[FileSource], nxt: list[int], i: int, length: int
               ) -> tuple[int, int, int] | None:
        """(file, offset, length) of the chunk sent after the one of `length` bytes at file
        `i`'s next offset, unless a refusal rewinds first."""
        offset = nxt[i] + length
        while i < len(files) and offset >= files[i].size:
            i += 1
            offset = nxt[i] if i < len(files) else 0
        if i == len(files):
            return None
        return i, offset, min(self.chunk_bytes, files[i].size - offset)

    async def _send(self, call: Any, todo: list[tuple[FileSource, int]], transfer: Transfer,
                    on_bytes: Callable[[int], None] | None) -> None:
        """Go-back-N per file, one window of WINDOW chunks across files (a small file's end
        does not drain it): a refusal rewinds that file to the worker's `held`, and the acks
        of its chunks sent before the refusal are passed over (the worker refused them too)."""
        files = [f for f, _ in todo]
        nxt = [held for _, held in todo]  # next offset to send, per file
        generation = [0] * len(files)
        refusals = [0] * len(files)
        inflight: deque[tuple[int, int, int, int]] = deque()  # file, offset, length, generation
        first = 0  # files before it are sent in full
        ahead: tuple[tuple[int, int, int], asyncio.Future] | None = None  # the next chunk, read
        try:
            while True:
                while len(inflight) < WINDOW:
                    while first < len(files) and nxt[first] >= files[first].size:
                        first += 1
                    if first == len(files):
                        break
                    i, f = first, files[first]
                    length = min(self.chunk_bytes, f.size - nxt[i])
                    key = (i, nxt[i], length)
                    if ahead is None or ahead[0] != key:
                        if ahead is not None:  # a refusal rewound: that read is not wanted
                            ahead[1].add_done_callback(_discard)
                        ahead = (key, asyncio.ensure_future(asyncio.to_thread(_chunk, f, *key[1:])))
                    data, digest = await ahead[1]
                    ahead = None
                    # read and hash the chunk after this one while this one is written
                    after = self._after(files, nxt, i, len(data))
                    if after is not None:
                        ahead = (after, asyncio.ensure_future(
                            asyncio.to_thread(_chunk, files[after[0]], *after[1:])))
                    if self.tamper is not None:
                        data = self.tamper(f.sha256, nxt[i], data)
                    await call.write(worker_pb2.FileChunk(
                        sha256=f.sha256, size=f.size, offset=nxt[i], data=data,
                        chunk_sha256=digest))
                    if on_bytes is not None:
                        on_bytes(len(data))
                    inflight.append((i, nxt[i], len(data), generation[i]))
                    nxt[i] += len(data)
                if not inflight:
                    return
                ack = await call.read()  # (a chunk read ahead is never needed after the last)
                if ack is grpc.aio.EOF:
                    raise ShipError("the worker ended the transfer early")
                i, sent_at, length, gen = inflight.popleft()
                if gen != generation[i]:
                    continue  # sent before a refusal of its file: refused too
                if ack.ok:
                    transfer.sent += length
                    continue
                f = files[i]
                refusals[i] += 1
                log.warning("chunk of %s at %d refused (%s): sending from %d again",
                            f.name, sent_at, ack.error, ack.held)
                if refusals[i] > MAX_REFUSALS:
                    raise ShipError(f"{f.name}: {refusals[i]} chunks refused, last: {ack.error}")
                transfer.resent += nxt[i] - ack.held
                transfer.sent = max(0, transfer.sent - max(0, sent_at - ack.held))
                generation[i] += 1
                nxt[i] = ack.held
                first = min(first, i)

        finally:
            if ahead is not None:
                ahead[1].add_done_callback(_discard)

def split(todo: list[tuple[FileSource, int]], n: int) -> list[list[tuple[FileSource, int]]]:
    """`todo` in `n` parts of about the same bytes, each in the order of `todo`."""
    parts: list[list[tuple[FileSource, int]]] = [[] for _ in range(n)]
    load = [0] * n
    for item in sorted(todo, key=lambda t: t[1] - t[0].size):  # largest left first
        i = load.index(min(load))
        parts[i].append(item)
        load[i] += item[0].size - item[1]
    order = {id(item): k for k, item in enumerate(todo)}
    return [sorted(p, key=lambda t: order[id(t)]) for p in parts]


def _discard(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a read nobody waits for is not logged


def _chunk(f: FileSource, offset: int, length: int) -> tuple[bytes, str]:
    """A chunk's bytes and sha256 (off the event loop: hashing releases the GIL)."""
    data = f.read(offset, length)
    return data, hashlib.sha256(data).hexdigest()


def describe(transfer: Transfer) -> str:
    """One line for the coordinator's terminal when a worker's shard is in place."""
    if transfer.local:
        return f"{transfer.worker}: has the model locally, nothing sent"
    if not transfer.total:
        return f"{transfer.worker}: shard in its cache, nothing sent"
    took = time.monotonic() - transfer.started
    return (f"{transfer.worker}: sent {format_size(transfer.total)} in {transfer.files} "
            f"file(s), {took:.1f}s ({format_size(int(transfer.total / max(took, 1e-6)))}/s)")
