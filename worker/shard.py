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
from mlx_lm.utils import _get_classes, load_config, load_model

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
    path: Path | None = None  # the model directory it was loaded from (its tokenizer.json)

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

    def keep_only(self, start: int, end: int) -> None:
        """Let go of the layers outside [start, end) (this shard serves no more; a new one
        takes the rest from it)."""
        for i in range(self.start, self.end):
            if not start <= i < end:
                self.family.inner.layers[i] = None

    @property
    def layers(self) -> list[nn.Module]:
        return self.family.inner.layers[self.start : self.end]


def _parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


def _load_recording(path: Path) -> tuple[nn.Module, set[str]]:
    """mlx-lm's `load_model` (lazy, not strict) and the names of the weights it found in the
    files, as the family's sanitize left them: no tensor's bytes are read."""
    given: set[str] = set()

    def classes(config: dict) -> tuple[type, type]:
        model_class, args_class = _get_classes(config)

        class Recording(model_class):  # type: ignore[misc, valid-type]
            def load_weights(self, weights: list, strict: bool = True) -> Any:
                given.update(name for name, _ in weights)
                return super().load_weights(weights, strict=strict)

        Recording.__name__ = model_class.__name__
        return Recording, args_class

    model, _ = load_model(path, lazy=True, strict=False, get_model_classes=classes)
    return model, given


def _reusable(reuse: Shard | None, model_type: str, num_layers: int) -> Shard | None:
    if reuse is None or reuse.model_type != model_type or reuse.num_layers != num_layers:
        return None
    return reuse


def load_shard(path: str | Path, start: int, end: int, reuse: Shard | None = None,
               same: frozenset[str] = frozenset()) -> Shard:
    """Load layers [start, end) of the model at `path`; other layers are never read from disk.

    mlx loads safetensors lazily: dropping the modules we do not need before the first
    `mx.eval` means their bytes are never materialised. The parts named in `same`
    (`layers.<i>`, `embed_tokens`, `norm`, `lm_head`: parts whose files are those `reuse`
    was loaded from) are taken from `reuse`, a shard already in memory, not read again.
    Every parameter the slice needs must come from the files or from `reuse` (ShardError
    naming the missing ones).
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
    model, given = _load_recording(path)
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
    kept = _reusable(reuse, model_type, num_layers)
    if kept is not None:
        for i in range(max(start, kept.start), min(end, kept.end)):
            if f"layers.{i}" in same and kept.family.inner.layers[i] is not None:
                inner.layers[i] = kept.family.inner.layers[i]
        for name in ("embed_tokens", "norm"):
            if name in same and name in inner and name in kept.family.inner:
                inner[name] = kept.family.inner[name]
        if "lm_head" in same and "lm_head" in model and "lm_head" in kept.model:
            model["lm_head"] = kept.model["lm_head"]
    # arrays taken from `reuse` are loaded already; every other one must come from a file
    taken = {id(v) for _, v in nn.utils.tree_flatten(kept.model.parameters())} if kept else set()
    missing = [n for n, v in nn.utils.tree_flatten(model.parameters())
               if n not in given and id(v) not in taken]
    if missing:
        raise ShardError(f"the files of layers [{start}, {end}) lack {len(missing)} tensor(s) "
                         f"they need: {', '.join(missing[:4])}")
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
        path=path,
    )
