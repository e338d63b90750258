"""The worker's shard cache: files received from the coordinator, stored by sha256, resumable.

Layout under `<cache dir>/weights` (nothing is ever written outside it):
- `blobs/ab/<sha256>`: complete files, each checked against its name;
- `partial/<sha256>`: a file being received, verified chunk by chunk (a transfer resumes at its
  size; a restarted worker resumes too);
- `shards/<key>/`: one directory per shard loaded (model, layers, files), links to the blobs
  plus `shard.json`; `mlx_lm` loads it as a model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.tensorfiles import check_hash, check_name

BLOCK = 4096  # a file takes whole blocks of the disk
HEADROOM = 64 << 20  # at most this much of the disk is left free after a shard is stored


class CacheFull(RuntimeError):
    """The cache dir's disk cannot hold the files a shard still needs."""


@dataclass
class Ack:
    """What a chunk did: accepted or not, the file complete, bytes held now, why not."""

    ok: bool
    complete: bool
    held: int
    error: str = ""


class _Receiving:
    """A partial file and the running sha256 of what it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.held = 0
        if path.exists():
            with path.open("rb") as f:
                while piece := f.read(8 << 20):
                    self.hash.update(piece)
                    self.held += len(piece)


class ShardCache:
    """Blobs by sha256, partial transfers and shard directories under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.shards = self.root / "shards"
        self._lock = threading.Lock()  # guards the dicts below; each file has its own lock
        self._file_locks: dict[str, threading.Lock] = {}
        self._receiving: dict[str, _Receiving] = {}
        self.received_bytes = 0  # bytes accepted into the cache since start

    def blob(self, sha: str) -> Path:
        check_hash(sha)
        return self.blobs / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.blob(sha).is_file()

    def held(self, sha: str) -> int:
        """Bytes of `sha` held: its size when complete, a partial's size, else 0."""
        path = self.blob(sha)
        if path.is_file():
            return path.stat().st_size
        part = self.partial / sha
        return part.stat().st_size if part.is_file() else 0

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    def needs(self, files: Iterable[Any]) -> list[tuple[Any, int]]:
        """(file, bytes held) of every file not complete in the cache, in order; CacheFull
        when the disk cannot hold the rest."""
        out, seen = [], set()
        for f in files:
            check_name(f.name)
            if f.sha256 in seen or self.has(f.sha256):
                continue
            seen.add(f.sha256)
            held = self.held(f.sha256)
            out.append((f, held if held <= f.size else 0))
        missing = sum(-(-(f.size - held) // BLOCK) * BLOCK for f, held in out)
        free = self.free_bytes()
        if missing and missing + min(HEADROOM, free // 10) > free:
            raise CacheFull(missing, free)
        return out

    def put(self, sha: str, size: int, offset: int, data: bytes, chunk_sha: str) -> Ack:
        """Append one chunk to the partial file of `sha` (checked by `chunk_sha`); the last
        chunk checks the whole file and moves it into the blobs."""
        check_hash(sha)
        with self._lock:
            lock = self._file_locks.setdefault(sha, threading.Lock())
        # files arrive on several streams at once: one file's chunks are taken in turn, and
        # different files are hashed and written in parallel
        with lock:
            if self.has(sha):
                return Ack(True, True, size)
            rec = self._receiving.get(sha)
            if rec is None:
                self.partial.mkdir(parents=True, exist_ok=True)
                rec = self._receiving[sha] = _Receiving(self.partial / sha)
            if offset != rec.held:
                return Ack(False, False, rec.held, f"chunk at {offset}, expected {rec.held}")
            if offset + len(data) > size or not data:
                return Ack(False, False, rec.held, f"chunk of {len(data)} bytes at {offset} "
                           f"does not fit a file of {size}")
            if hashlib.sha256(data).hexdigest() != chunk_sha:
                return Ack(False, False, rec.held, f"chunk at {offset}: sha256 mismatch")
            with rec.path.open("ab") as f:
                f.write(data)
            rec.hash.update(data)
            rec.held += len(data)
            with self._lock:
                self.received_bytes += len(data)
            if rec.held < size:
                return Ack(True, False, rec.held)
            del self._receiving[sha]
            if rec.hash.hexdigest() != sha:
                rec.path.unlink(missing_ok=True)
                return Ack(False, False, 0, "file sha256 mismatch: sending it again")
            final = self.blob(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(rec.path, final)
            with self._lock:
                self._file_locks.pop(sha, None)  # a chunk still waiting on it sees has(sha)
            return Ack(True, True, size)

    def assemble(self, model_id: str, layers: tuple[int, int], files: Iterable[Any]) -> Path:
        """The shard directory of these files (links into the blobs); ValueError naming a
        file the cache lacks."""
        files = list(files)
        for f in files:
            check_name(f.name)
            if not self.has(f.sha256):
                raise ValueError(f"the cache lacks {f.name} ({f.sha256[:12]}): it was not sent")
        key = hashlib.sha256(json.dumps(
            [model_id, list(layers), sorted((f.name, f.sha256) for f in files)]).encode()
        ).hexdigest()[:24]
        path = self.shards / key
        meta = {"model_id": model_id, "layers": list(layers), "used": time.time(),
                "files": {f.name: f.sha256 for f in files},
                "bytes": sum(f.size for f in files)}
        tmp = self.shards / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            (tmp / f.name).symlink_to(os.path.relpath(self.blob(f.sha256), path))
        (tmp / "shard.json").write_text(json.dumps(meta))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    # -- what `worker cache list` and `worker cache prune` show and remove -------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every shard directory's `shard.json` (with its key), most recently used first."""
        out = []
        for d in sorted(self.shards.glob("*")) if self.shards.is_dir() else []:
            try:
                meta = json.loads((d / "shard.json").read_text())
            except (OSError, ValueError):
                continue
            out.append({**meta, "key": d.name})
        return sorted(out, key=lambda m: -m.get("used", 0))

    def usage(self) -> tuple[int, int, int]:
        """(blob files, their bytes, bytes of partial transfers)."""
        blobs = [p for p in self.blobs.glob("*/*") if p.is_file()] if self.blobs.is_dir() else []
        partial = sum(p.stat().st_size for p in self.partial.glob("*")) \
            if self.partial.is_dir() else 0
        return len(blobs), sum(p.stat().st_size for p in blobs), partial

    def prune(self, model_id: str | None = None, everything: bool = False) -> int:
        """Remove partial transfers, the shards of `model_id` (or all), then every blob no
        shard links to; the bytes freed."""
        freed = 0
        if self.partial.is_dir():
            for p in self.partial.glob("*"):
                freed += p.stat().st_size
                p.unlink()
        for meta in self.entries():
            if everything or (model_id is not None and meta.get("model_id") == model_id):
                shutil.rmtree(self.shards / meta["key"], ignore_errors=True)
        kept = {sha for m in self.entries() for sha in m.get("files", {}).values()}
        if self.blobs.is_dir():
            for p in self.blobs.glob("*/*"):
                if p.name not in kept:
                    freed += p.stat().st_size
                    p.unlink()
        return freed
