"""Quantized products padded to the row count at which the device computes them fastest.

MLX 0.32's quantized matrix product on CUDA costs 2.4 times one row's for 5 rows and is back
near one row's from 8 (bench/RESULTS-gpu.md, "Rows per product"). A decode step of 2 to 7
sequences multiplies that many rows in every projection, so on such a device each quantized
layer of a shard gets its input padded to `floor` rows with zeros and its output cut back:
the real rows' values come from the same weights, and one pad and one slice per product cost
far less than the slow kernel. `worker/backend.py` `row_floor` says where (1: nowhere).

A chunk of one sequence is padded once for all its layers instead (worker/stage.py
`_padding`), so its products already have the rows.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def _through(product: Any, x: mx.array, floor: int) -> mx.array:
    """`product(x)` with 2 to floor - 1 rows of `x` computed as `floor` (zero rows added, then
    cut off the output)."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if not 1 < rows < floor:
        return product(x)
    flat = mx.pad(x.reshape(rows, x.shape[-1]), [(0, floor - rows), (0, 0)])
    return product(flat)[:rows].reshape(*x.shape[:-1], -1)


class PaddedQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that computes 2 to floor - 1 rows as `pad_rows` rows."""

    pad_rows = 1

    def __call__(self, x: mx.array) -> mx.array:
        return _through(super().__call__, x, self.pad_rows)


class PaddedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose use as the head (`as_linear`) pads like the linear layers."""

    pad_rows = 1

    def as_linear(self, x: mx.array) -> mx.array:
        return _through(super().as_linear, x, self.pad_rows)


_PADDED = {nn.QuantizedLinear: PaddedQuantizedLinear,
           nn.QuantizedEmbedding: PaddedQuantizedEmbedding}


def pad_products(model: Any, floor: int) -> int:
    """Make every quantized linear layer (and quantized embedding, as a head) of `model` pad
    its input to `floor` rows (1: none, also for layers padded before); returns how many
    layers pad now."""
    changed = 0
    for _, module in model.named_modules():
        padded = _PADDED.get(type(module))
        if padded is None and type(module) in _PADDED.values():
            padded = type(module)
        if padded is None or (floor <= 1 and type(module) is not padded):
            continue
        module.__class__ = padded
        module.pad_rows = max(1, floor)
        changed += floor > 1
    return changed
