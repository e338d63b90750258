"""Attention of a few query positions without a kernel or plan made per shape (CUDA).

On MLX 0.32's CUDA backend, `mx.fast.scaled_dot_product_attention` with 2 or more query
positions costs 70 to 90 ms on an 8B-shaped llama whenever the key length is one it has not met
yet, and 14 to 27 ms when it has (bench/RESULTS-speculation.md, "Attention of a few positions
on CUDA"): there it runs cuDNN's attention, whose graph MLX builds and caches per shape of the
queries and keys. A chunk of proposals to check (2 to 8 positions) comes at a new key length every
round, so every round paid that. Composed of plain operations (`few_queries`, exactly as MLX
composes it where it has no fused kernel: its CPU backend, bit-identical there,
tests/test_attention.py) it costs the same at every length, but its two matrix products a layer
go to cuBLAS, which MLX sets up afresh for every product (descriptors, an algorithm search, a
captured launch), and its bits differ from a one-position step's.

`by_position` computes a causal chunk one query position at a time with MLX's one-position
kernel over that position's keys: what a decode step of that position alone computes, so a
check of proposals gives each position the same bits as one-token steps would, and nothing is
set up per shape. On an H100 that took a stage's launch of a check built ahead from 4.2-4.9
ms to 3.7-3.9 ms, the first check on fresh workers from 38 s to 0.15 s, and made checks on
CUDA token-exact (bench/RESULTS-speculation.md). `install` routes causal chunks of 2 to FEW
positions through it, other masks of that size through `few_queries`, for the whole process
(mlx-lm's attention layers call `mx.fast.scaled_dot_product_attention` by that name); a stage
installs it where `worker/backend.py` `accelerator` says CUDA, the coordinator's draft model
too.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

FEW = 16  # query positions up to which the composed attention is used
_fused: Any = None  # mx.fast.scaled_dot_product_attention as MLX has it


def few_queries(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
                mask: mx.array | str | None = None) -> mx.array:
    """Scaled dot-product attention of `queries` (B, H, L, D) over `keys` and `values`
    (B, H_kv, S, D): MLX's own composition (grouped heads, a causal or given mask, a precise
    softmax)."""
    b, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    q = mx.array(scale, queries.dtype) * queries
    k, v = keys, values
    if repeats > 1:
        q = q.reshape(b, kv_heads, repeats, length, dim)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ k.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal": query i sees keys up to its own position
        span = k.shape[-2]
        mask = mx.arange(span - length, span)[:, None] >= mx.arange(span)[None]
    if mask is not None:
        if repeats > 1 and mask.ndim >= 3:
            mask = mx.expand_dims(mask, -3) if mask.shape[-3] == 1 else mask.reshape(
                *mask.shape[:-3], kv_heads, repeats, *mask.shape[-2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-float("inf"), scores.dtype))
        else:
            scores = scores + mask
    out = mx.softmax(scores, axis=-1, precise=True) @ v
    return out.reshape(b, heads, length, dim) if repeats > 1 else out


def by_position(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float
                ) -> mx.array:
    """Causal attention of `queries` (B, H, L, D), the last L of the `keys`' positions, one
    position at a time: position i over the keys up to its own, by MLX's attention of one
    query (no mask), as a decode step of that position computes it."""
    length, span = queries.shape[2], keys.shape[2]
    fused = _fused or mx.fast.scaled_dot_product_attention
    rows = [fused(q, keys[:, :, : span - length + i + 1], values[:, :, : span - length + i + 1],
                  scale=scale, mask=None)
            for i, q in enumerate(mx.split(queries, length, axis=2))]  # one node for the rows
    return mx.concatenate(rows, axis=2)


def _routed(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
            mask: Any = None, sinks: Any = None, **kwargs: Any) -> mx.array:
    causal = isinstance(mask, str) and mask == "causal"
    plain = mask is None or isinstance(mask, mx.array) or causal
    if plain and sinks is None and not kwargs and 1 < queries.shape[2] <= FEW:
        if causal:
            return by_position(queries, keys, values, scale=scale)
        return few_queries(queries, keys, values, scale=scale, mask=mask)
    extra = {"sinks": sinks} if sinks is not None else {}
    return _fused(queries, keys, values, scale=scale, mask=mask, **extra, **kwargs)


def install(on: bool) -> bool:
    """Route attention of 2 to FEW query positions through `few_queries` in this process
    (`on`), or back to MLX's fused kernel; returns whether it is routed now."""
    global _fused
    if _fused is None:
        _fused = mx.fast.scaled_dot_product_attention
    mx.fast.scaled_dot_product_attention = _routed if on else _fused
    return on


def routed() -> bool:
    """Whether this process routes attention of a few positions through `few_queries`."""
    return mx.fast.scaled_dot_product_attention is _routed
