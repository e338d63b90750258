"""What a model costs to place, read from config.json and safetensors headers without loading it.

Relies only on the Hugging Face layout: `config.json` plus `model*.safetensors` (optionally
sharded with `model.safetensors.index.json`). A safetensors file opens with an 8-byte
little-endian header length and a JSON header giving every tensor's dtype, shape and byte range,
so per-layer sizes are exact, quantized scales and biases included.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Any

from protos import SUPPORTED_FAMILIES

DEFAULT_MAX_CONTEXT = 4096

# What mlx-lm fetches for a model (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), without importing mlx.
DOWNLOAD_PATTERNS = [
    "*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
    "*.txt", "*.jsonl", "*.jinja",
]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER = 256 * 1024 * 1024


class ModelError(Exception):
    """A model that cannot be found, read or served; the message is one line for a human."""


@dataclass(frozen=True)
class ModelInfo:
    """Sizes that the planner needs: bytes per layer, embedding, head, norm and KV per token."""

    path: Path
    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    norm_bytes: int
    tied: bool
    kv_bytes_per_token: tuple[int, ...]
    max_context: int = DEFAULT_MAX_CONTEXT
    quantization: dict | None = None
    activation_bytes: int = 2  # bytes per hidden-state element sent between stages

    def max_prefill_chunk(self, max_message_bytes: int) -> int:
        """The most prompt tokens whose activations fit one gRPC message (1 MiB kept spare)."""
        return max(1, (max_message_bytes - (1 << 20)) // (self.hidden_size * self.activation_bytes))

    @property
    def weight_bytes(self) -> int:
        """Every tensor once (a tied head is the embedding, not a second copy)."""
        head = 0 if self.tied else self.head_bytes
        return sum(self.layer_bytes) + self.embed_bytes + self.norm_bytes + head

    def stage_bytes(self, start: int, end: int, num_layers_total: int | None = None) -> int:
        """Weights a stage holding layers [start, end) loads.

        The first stage adds the embedding, the last (`end == num_layers_total`, default
        `num_layers`) adds norm and head. A single stage with tied embeddings loads the
        embedding once.
        """
        total = self.num_layers if num_layers_total is None else num_layers_total
        self._check_range(start, end)
        size = self._layer_prefix[end] - self._layer_prefix[start]
        if start == 0:
            size += self.embed_bytes
        if end == total:
            size += self.norm_bytes
            if not (self.tied and start == 0):
                size += self.head_bytes
        return size

    def in_stage(self, tensor: str, start: int, end: int) -> bool:
        """Whether a stage holding layers [start, end) loads checkpoint tensor `tensor` (the
        split `stage_bytes` counts: layers, embedding first, norm and head last)."""
        if match := _LAYER.search(tensor):
            return start <= int(match.group(1)) < end
        last = end == self.num_layers
        if "embed_tokens." in tensor:
            return start == 0 or (last and self.tied)
        return last

    def kv_bytes(self, start: int, end: int) -> int:
        """KV cache bytes per token of one sequence for layers [start, end)."""
        self._check_range(start, end)
        return self._kv_prefix[end] - self._kv_prefix[start]

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside 0..{self.num_layers}")

    # Prefix sums keep the planner's dynamic programs at O(1) per candidate stage.
    @cached_property
    def _layer_prefix(self) -> tuple[int, ...]:
        return (0, *accumulate(self.layer_bytes))

    @cached_property
    def _kv_prefix(self) -> tuple[int, ...]:
        return (0, *accumulate(self.kv_bytes_per_token))


def check_family(info_or_config: ModelInfo | Mapping[str, Any] | str) -> None:
    """Refuse a model family that Shardline has not proven token-exact against mlx-lm."""
    if isinstance(info_or_config, ModelInfo):
        family = info_or_config.model_type
    elif isinstance(info_or_config, Mapping):
        family = info_or_config.get("model_type")
    else:
        family = info_or_config
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory, with a nested `text_config` folded in as defaults."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is not a model directory: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a JSON object")
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**text, **config}
    return config


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} from one safetensors file's header."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, _MAX_HEADER):
                raise ModelError(f"{file} is not a safetensors file (a Git LFS pointer?)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read safetensors header of {file}: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a malformed safetensors header")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        start, end = entry.get("data_offsets", (0, -1)) if isinstance(entry, dict) else (0, -1)
        if not 0 <= start <= end <= data_size:
            raise ModelError(f"{file} is truncated or corrupt (tensor {name!r})")
    return header


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, else every `model*.safetensors`."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {index}: {exc}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelError(f"{path} lacks shard(s) named in its index: {', '.join(missing)}")
        return files
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no model*.safetensors weights")
    return files


def read_tensors(path: Path) -> dict[str, dict[str, Any]]:
    """Every tensor header entry across the checkpoint's files."""
    tensors: dict[str, dict[str, Any]] = {}
    for file in weight_files(path):
        for name, entry in read_safetensors_header(file).items():
            if name in tensors:
                raise ModelError(f"tensor {name!r} appears in more than one file of {path}")
            tensors[name] = entry
    return tensors


def _nbytes(entry: Mapping[str, Any]) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _is_head(name: str) -> bool:
    return name.startswith("lm_head.") or ".lm_head." in name


def _activation_bytes(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> int:
    """Bytes per activation element: MLX computes in the embedding's float dtype.

    The weights decide in MLX (a quantized embedding's scales carry the dtype); the config's
    dtype is the fallback.
    """
    for suffix in ("embed_tokens.weight", "embed_tokens.scales"):
        for name, entry in tensors.items():
            if name.endswith(suffix) and entry.get("dtype") in _FLOAT_BYTES:
                return _FLOAT_BYTES[entry["dtype"]]
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return 4 if dtype == "float32" else 2


def _config_int(config: Mapping[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{path}/config.json: {key} is missing or not a positive integer")
    return value


def read_model_info(path: str | Path, model_id: str | None = None) -> ModelInfo:
    """Sizes of the model in directory `path`, from its config and weight headers only."""
    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{path}/config.json has no model_type")
    num_layers = _config_int(config, "num_hidden_layers", path)
    hidden = _config_int(config, "hidden_size", path)
    heads = _config_int(config, "num_attention_heads", path)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads

    layer_bytes = [0] * num_layers
    embed = head = norm = 0
    tensors = read_tensors(path)
    for name, entry in tensors.items():
        size = _nbytes(entry)
        if match := _LAYER.search(name):
            i = int(match.group(1))
            if i >= num_layers:
                raise ModelError(
                    f"{path}: tensor {name!r} is beyond the {num_layers} layers of config.json"
                )
            layer_bytes[i] += size
        elif "embed_tokens." in name:
            embed += size
        elif _is_head(name):
            head += size
        else:
            norm += size
    missing = [i for i, size in enumerate(layer_bytes) if size == 0]
    if missing:
        raise ModelError(f"{path}: the weights lack layer(s) {missing[:8]}")
    if embed == 0:
        raise ModelError(f"{path}: the weights have no embed_tokens")

    # mlx-lm drops lm_head from tied checkpoints, so its absence is what ties the head.
    tied = head == 0
    act_bytes = _activation_bytes(config, tensors)
    kv_token = 2 * kv_heads * head_dim * act_bytes
    quantization = config.get("quantization") or config.get("quantization_config")
    return ModelInfo(
        path=path,
        model_id=model_id or path.name,
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed,
        head_bytes=embed if tied else head,
        norm_bytes=norm,
        tied=tied,
        kv_bytes_per_token=(kv_token,) * num_layers,
        max_context=config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT,
        quantization=quantization if isinstance(quantization, dict) else None,
        activation_bytes=act_bytes,
    )


def _looks_local(spec: str) -> bool:
    """A path-shaped spec is never a Hugging Face repo id (those are `owner/name`)."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """A local model directory, or a Hugging Face repo id downloaded (once) into the HF cache."""
    local = Path(spec).expanduser()
    if local.exists() or _looks_local(spec):
        if not local.exists():
            raise ModelError(f"no model directory at {spec}")
        if not local.is_dir():
            raise ModelError(f"{spec} is not a model directory")
        if not (local / "config.json").is_file():
            raise ModelError(f"{spec} is not a model directory: no config.json")
        return local
    try:
        from huggingface_hub import snapshot_download

        where = {"cache_dir": str(cache_dir) if cache_dir else None,
                 "allow_patterns": DOWNLOAD_PATTERNS}
        try:  # the local Hugging Face cache first: no network when it holds the repo
            fetched = Path(snapshot_download(spec, local_files_only=True, **where))
        except Exception:  # noqa: BLE001 - not cached (or partly): download, with progress
            fetched = Path(snapshot_download(spec, **where))
    except Exception as exc:  # bad id, offline, 404, gated: all mean the same to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(
            f"{spec!r} is neither a local model directory nor a downloadable Hugging Face repo "
            f"({reason})"
        ) from None
    if not (fetched / "config.json").is_file():
        raise ModelError(f"Hugging Face repo {spec!r} has no config.json; not an MLX model")
    return fetched
