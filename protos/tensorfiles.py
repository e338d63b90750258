"""A shard's files as they travel and are cached: one tensor per safetensors file, named by sha256.

A checkpoint's tensor becomes a file of its own: an 8-byte header length, a canonical JSON header
naming only that tensor (dtype, shape, `data_offsets` [0, n]), padded to 8 bytes, then the
tensor's bytes exactly as in the checkpoint. The file is named by the sha256 of all of it, so
the same tensor of two models (same name, dtype, shape and bytes) is one file in a worker's
cache, and `mx.load` reads it as it reads any checkpoint.

Hashing a model reads all of its bytes once; the hashes are kept in an index beside the cache
(keyed by each checkpoint file's path, size and modification time) so a restart reads nothing.
Pure Python: the coordinator and the worker both use it and neither needs MLX for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HASH_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(
    r"^(config\.json|hf_quant_config\.json|tokenizer\.json|model-[0-9a-f]{64}\.safetensors)$")
READ_BYTES = 8 << 20
INDEX_VERSION = 1
# The small files of a model directory a worker needs besides tensors: mlx_lm.utils.load_model
# reads the configs; the last stage's grammars (worker/constrain.py) read tokenizer.json.
CONFIG_FILES = ("config.json", "hf_quant_config.json", "tokenizer.json")


class TensorFileError(ValueError):
    """A checkpoint that cannot be split into tensor files (unreadable, malformed)."""


def blob_header(name: str, entry: dict[str, Any]) -> bytes:
    """The 8-byte length and JSON header of the single-tensor file of checkpoint entry `entry`."""
    start, end = entry["data_offsets"]
    header = json.dumps(
        {name: {"dtype": entry["dtype"], "shape": list(entry["shape"]),
                "data_offsets": [0, end - start]}},
        separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


@dataclass(frozen=True)
class FileSource:
    """One file of a shard and where its bytes come from: a literal prefix (the header) and
    a byte range of a local file."""

    name: str  # config.json, or model-<sha256>.safetensors
    sha256: str
    size: int
    path: Path
    start: int = 0
    end: int = -1  # -1: to the end of the file
    prefix: bytes = b""
    tensor: str = ""  # the checkpoint's tensor name ("" for a config file)

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes of the file from `offset` (fewer at its end)."""
        out = bytearray()
        if offset < len(self.prefix):
            out += self.prefix[offset : offset + length]
        body_from = max(0, offset - len(self.prefix))
        want = length - len(out)
        if want > 0:
            end = self.end if self.end >= 0 else self.start + self.size - len(self.prefix)
            begin = self.start + body_from
            with self.path.open("rb") as f:
                f.seek(begin)
                out += f.read(max(0, min(want, end - begin)))
        return bytes(out)

    def chunks(self, offset: int, chunk: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of at most `chunk` bytes from `offset` to the end."""
        while offset < self.size:
            data = self.read(offset, min(chunk, self.size - offset))
            if not data:
                raise TensorFileError(f"{self.path} shrank while it was read")
            yield offset, data
            offset += len(data)


def _hash_range(f: Any, prefix: bytes, start: int, end: int) -> str:
    h = hashlib.sha256(prefix)
    f.seek(start)
    left = end - start
    while left > 0:
        piece = f.read(min(READ_BYTES, left))
        if not piece:
            raise TensorFileError(f"{f.name} is truncated")
        h.update(piece)
        left -= len(piece)
    return h.hexdigest()


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TensorFileError(f"{path} is not a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > 256 << 20:
                raise TensorFileError(f"{path} is not a safetensors file")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"cannot read {path}: {e}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path} has a malformed safetensors header")
    header.pop("__metadata__", None)
    return 8 + length, header


class HashIndex:
    """Tensor files of checkpoint files, hashed once and remembered in `index_dir`."""

    def __init__(self, index_dir: Path | None) -> None:
        self.index_dir = index_dir

    def _index_file(self, path: Path) -> Path | None:
        if self.index_dir is None:
            return None
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.index_dir / f"{key}.json"

    def tensors(self, path: Path, progress: Callable[[int], None] | None = None
                ) -> dict[str, FileSource]:
        """Tensor name -> its file, for the checkpoint file `path` (hashing it unless the
        index knows this path at this size and time); `progress(bytes)` while hashing."""
        stat = path.stat()
        stamp = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        data_start, header = _read_header(path)
        index_file = self._index_file(path)
        known: dict[str, str] = {}
        if index_file is not None and index_file.is_file():
            try:
                saved = json.loads(index_file.read_text())
                if all(saved.get(k) == v for k, v in stamp.items()):
                    known = saved["hashes"]
            except (OSError, ValueError, KeyError, TypeError):
                known = {}
        out: dict[str, FileSource] = {}
        with path.open("rb") as f:
            for name, entry in header.items():
                try:
                    begin, end = (data_start + o for o in entry["data_offsets"])
                    prefix = blob_header(name, entry)
                except (KeyError, TypeError, ValueError):
                    raise TensorFileError(f"{path}: malformed entry for {name!r}") from None
                if not data_start <= begin <= end <= stat.st_size:
                    raise TensorFileError(f"{path} is truncated or corrupt (tensor {name!r})")
                sha = known.get(name)
                if sha is None:
                    sha = _hash_range(f, prefix, begin, end)
                    if progress is not None:
                        progress(end - begin)
                out[name] = FileSource(
                    name=f"model-{sha}.safetensors", sha256=sha,
                    size=len(prefix) + end - begin, path=path, start=begin, end=end,
                    prefix=prefix, tensor=name)
        if index_file is not None and set(known) != set(out):
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(
                {**stamp, "path": str(path), "hashes": {n: s.sha256 for n, s in out.items()}}))
            os.replace(tmp, index_file)
        return out


def config_file(path: Path) -> FileSource:
    """A small file of the model directory (config.json) as a shard file."""
    data = path.read_bytes()
    return FileSource(name=path.name, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                      path=path)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The model directory's safetensors files (the index's, else every model*.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TensorFileError(f"cannot read {index}: {e}") from None
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("model*.safetensors"))


def model_tensors(model_dir: Path, index: HashIndex,
                  progress: Callable[[int], None] | None = None) -> dict[str, FileSource]:
    """Every tensor of the model at `model_dir` as a shard file."""
    out: dict[str, FileSource] = {}
    for file in checkpoint_files(model_dir):
        out.update(index.tensors(file, progress))
    return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def part_of(tensor: str) -> str:
    """Which part of a model a checkpoint tensor belongs to: `layers.<i>`, `embed_tokens`,
    `lm_head` or `norm` (everything else outside the layers)."""
    if match := _LAYER.search(tensor):
        return f"layers.{match.group(1)}"
    if "embed_tokens." in tensor:
        return "embed_tokens"
    if tensor.startswith("lm_head.") or ".lm_head." in tensor:
        return "lm_head"
    return "norm"


def parts(files: Iterable[Any]) -> dict[str, frozenset[str]]:
    """Part -> the sha256s of its tensors' files, for shard files that name their tensor."""
    out: dict[str, set[str]] = {}
    for f in files:
        if f.tensor:
            out.setdefault(part_of(f.tensor), set()).add(f.sha256)
    return {k: frozenset(v) for k, v in out.items()}


def check_name(name: str) -> str:
    """`name` if it is a shard file name a worker may write (never a path), else ValueError."""
    if not NAME_RE.match(name):
        raise ValueError(f"not a shard file name: {name[:80]!r}")
    return name


def check_hash(sha: str) -> str:
    """`sha` if it is a lowercase hex sha256, else ValueError."""
    if not HASH_RE.match(sha):
        raise ValueError(f"not a sha256: {sha[:80]!r}")
    return sha
