"""Per-family adapters: how a slice of an mlx-lm model embeds, masks and projects to logits.

mlx-lm models compute masks from global layer indices inside their own `__call__`, so a stage
cannot call it on a cut layer list. Each family here replicates, exactly, the three places where
families differ: the embedding scale, the mask each layer gets, and the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from protos import SUPPORTED_FAMILIES


class UnsupportedFamily(ValueError):
    """The model's family has no adapter; serving it could give wrong tokens."""


@dataclass(frozen=True)
class MaskKind:
    """Which mask a layer needs: a sliding window (None for full attention), as an array or not."""

    window: int | None = None
    return_array: bool = False


class Family:
    """Plain decoder: `embed_tokens`, `layer(h, mask, cache)`, `norm`, `lm_head` or a tied head."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self.args = model.args

    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens)

    def mask_kind(self, index: int) -> MaskKind:
        """The mask kind of global layer `index`."""
        return MaskKind()

    def head(self, h: mx.array) -> mx.array:
        h = self.inner.norm(h)
        if "lm_head" in self.model:
            return self.model.lm_head(h)
        return self.inner.embed_tokens.as_linear(h)

    @property
    def tied(self) -> bool:
        return "lm_head" not in self.model

    def masks(self, h: mx.array, start: int, caches: Sequence[Any]) -> list[Any]:
        """One mask per layer of the slice starting at global index `start`.

        A mask depends on the cache's offset and kind only, so layers of one kind share it.
        """
        built: dict[MaskKind, Any] = {}
        out = []
        for i, cache in enumerate(caches):
            kind = self.mask_kind(start + i)
            if kind not in built:
                built[kind] = create_attention_mask(
                    h, cache, window_size=kind.window, return_array=kind.return_array
                )
            out.append(built[kind])
        return out


class Llama(Family):
    """llama and mistral (mlx-lm maps mistral to llama); `layer_types` may add sliding layers."""

    def mask_kind(self, index: int) -> MaskKind:
        layer = self.inner.layers[index]
        if getattr(layer, "use_sliding", False):
            return MaskKind(window=self.inner.sliding_window)
        return MaskKind()


class Gemma(Family):
    """gemma: embeddings scaled by sqrt(hidden); always a tied head."""

    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens) * (self.args.hidden_size**0.5)


class Gemma2(Gemma):
    """gemma2: array masks (manual attention with soft-capping) and soft-capped logits."""

    def mask_kind(self, index: int) -> MaskKind:
        return MaskKind(return_array=True)

    def masks(self, h: mx.array, start: int, caches: Sequence[Any]) -> list[Any]:
        # gemma2 attends with grouped queries (B, kv_heads, repeats, L, S): a batch mask
        # (B, 1, L, S) needs one more axis to broadcast.
        return [mx.expand_dims(m, 2) if isinstance(m, mx.array) and m.ndim == 4 else m
                for m in super().masks(h, start, caches)]

    def head(self, h: mx.array) -> mx.array:
        out = super().head(h)
        cap = self.model.final_logit_softcapping
        return mx.tanh(out / cap) * cap


class Gemma3Text(Family):
    """gemma3_text: bf16-rounded embedding scale; sliding vs global chosen by global index."""

    def embed(self, tokens: mx.array) -> mx.array:
        h = self.inner.embed_tokens(tokens)
        return h * mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

    def mask_kind(self, index: int) -> MaskKind:
        pattern = self.inner.sliding_window_pattern
        if pattern <= 1 or index % pattern == pattern - 1:
            return MaskKind()
        return MaskKind(window=self.inner.window_size)


_ADAPTERS: dict[str, type[Family]] = {
    "llama": Llama,
    "mistral": Llama,
    "qwen2": Family,
    "qwen3": Family,
    "gemma": Gemma,
    "gemma2": Gemma2,
    "gemma3_text": Gemma3Text,
    "phi3": Family,
}


def check_family(model_type: str) -> None:
    """Raise UnsupportedFamily naming `model_type` unless an adapter exists for it."""
    if model_type not in _ADAPTERS:
        raise UnsupportedFamily(
            f"model family {model_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_FAMILIES)
        )


def adapter_for(model: nn.Module, model_type: str) -> Family:
    """The adapter that runs slices of `model` exactly as its own `__call__` would."""
    check_family(model_type)
    return _ADAPTERS[model_type](model)
