"""Load one contiguous slice of an MLX model's layers, reading only that slice's weights."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.utils import load_config, load_model

from worker.families import Family, adapter_for, check_family


class ShardError(ValueError):
    """The slice asked for cannot be loaded (bad range, missing files, unsupported family)."""


@dataclass
class Shard:
    """A loaded slice: layers [start, end) plus the embedding (first) or norm and head (last)."""

    model: nn.Module
    family: Family
    model_type: str
    start: int
    end: int
    num_layers: int
    weight_bytes: int
    load_seconds: float
    cache_template: list[Any]

    def new_caches(self) -> list[Any]:
        """Fresh, empty KV caches for this slice's layers (family-correct kinds)."""
        return copy.deepcopy(self.cache_template)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def forkable(self) -> bool:
        """Every cache is a plain KVCache, so a prefix of it can be copied at any length."""
        return all(type(c) is KVCache for c in self.cache_template)

    @property
    def layers(self) -> list[nn.Module]:
        return self.family.inner.layers[self.start : self.end]


def _parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


def load_shard(path: str | Path, start: int, end: int) -> Shard:
    """Load layers [start, end) of the model at `path`; other layers are never read from disk.

    mlx loads safetensors lazily: dropping the modules we do not need before the first
    `mx.eval` means their bytes are never materialised.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ShardError(f"no MLX model at {path} (config.json missing)")
    config = load_config(path)
    model_type = config.get("model_type", "")
    try:
        check_family(model_type)
    except ValueError as e:
        raise ShardError(str(e)) from None
    num_layers = int(config["num_hidden_layers"])
    if not 0 <= start < end <= num_layers:
        raise ShardError(f"layer range [{start}, {end}) is outside the model's {num_layers} layers")
    model, _ = load_model(path, lazy=True, strict=False)
    family = adapter_for(model, model_type)
    inner = family.inner
    tied = family.tied
    # Some families derive cache kinds from their layers, so take the template before cutting.
    cache_template = make_prompt_cache(model)[start:end]
    for i in range(num_layers):
        if not start <= i < end:
            inner.layers[i] = None
    if start != 0 and not (end == num_layers and tied):
        inner.pop("embed_tokens")
    if end != num_layers:
        inner.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    mx.eval(model.parameters())
    return Shard(
        model=model,
        family=family,
        model_type=model_type,
        start=start,
        end=end,
        num_layers=num_layers,
        weight_bytes=_parameter_bytes(model),
        load_seconds=time.perf_counter() - t0,
        cache_template=cache_template,
    )
