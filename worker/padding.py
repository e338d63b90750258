"""Quantized products computed as one matrix of rows, padded where fewer rows cost more.

MLX 0.32's quantized matrix product on CUDA (bench/RESULTS-gpu.md, "Rows laid out as one
matrix"):
- of one matrix of M rows, (1, M, K), costs about M times one row's for 2 to 7 rows and about
  3 times one row's from 8 rows up (16 rows: the same as 8); so 4 to 7 rows cost less padded
  to 8, 2 rows (and by the trend 3) cost less as they are;
- of M one-row vectors, (M, 1, K), as a decode step of M sequences has them, costs M times one
  row's for any M: 8 sequences cost 1.9 times what the same rows cost as one matrix.

So on such a device each quantized layer of a shard multiplies its rows as one matrix
(`rows_for`: padded with zeros to `floor` from half of it) and cuts its output back: the real
rows' values come from the same weights, and one reshape, pad and slice per product cost far
less than the slow kernels. `worker/backend.py` `row_floor` says where (1: nowhere).

A chunk of one sequence is padded once for all its layers instead (worker/stage.py
`_padding`), so its products already have the rows.

Where worker/cuda_rows.py's kernel applies (CUDA, 4-bit affine weights, bf16 rows), a layer
multiplies 2 to 8 rows with it instead: it reads each weight once for all rows and gives
every row what that row alone gives, so nothing is padded (`set_up`).
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from worker import cuda_rows

log = logging.getLogger("shardline.worker")


def rows_for(rows: int, floor: int) -> int:
    """The rows a product of `rows` is computed as where `floor` rows cost about what 4 to
    7 do (`floor` 8 on CUDA): `floor` from half of it up to it, else `rows` as they are."""
    return floor if 1 < rows < floor and 2 * rows >= floor else rows


def as_one_matrix(product: Any, x: mx.array, floor: int) -> mx.array:
    """`product(x)` with 2 or more rows of `x` computed as one matrix, of `rows_for` rows
    (zero rows added, then cut off the output); `floor` 1: `product(x)` as it is."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    computed = rows_for(rows, floor)
    if floor <= 1 or rows < 2 or (computed == rows and x.shape[-2] == rows):
        return product(x)
    flat = x.reshape(rows, x.shape[-1])
    if computed > rows:
        flat = mx.pad(flat, [(0, computed - rows), (0, 0)])
    out = product(flat)
    return (out[:rows] if computed > rows else out).reshape(*x.shape[:-1], -1)


def _by_kernel(layer: Any, x: mx.array) -> mx.array | None:
    """`x` times the layer's quantized weight by worker/cuda_rows.py, or None where it does
    not apply (or the layer does not use it: `rows_kernel`, set once by `pad_products`)."""
    if not layer.rows_kernel or not cuda_rows.applies(x):
        return None
    return cuda_rows.rows_product(x, layer["weight"], layer["scales"], layer["biases"],
                                  layer.group_size)


class PaddedQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that computes a few rows by worker/cuda_rows.py where it applies,
    else its rows as one matrix of `rows_for` rows."""

    pad_rows = 1
    rows_kernel = False

    def __call__(self, x: mx.array) -> mx.array:
        out = _by_kernel(self, x)
        if out is None:
            return as_one_matrix(super().__call__, x, self.pad_rows)
        return out + self["bias"] if "bias" in self else out


class PaddedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose use as the head (`as_linear`) computes its rows like the
    linear layers."""

    pad_rows = 1
    rows_kernel = False

    def as_linear(self, x: mx.array) -> mx.array:
        out = _by_kernel(self, x)
        return as_one_matrix(super().as_linear, x, self.pad_rows) if out is None else out


_PADDED = {nn.QuantizedLinear: PaddedQuantizedLinear,
           nn.QuantizedEmbedding: PaddedQuantizedEmbedding}


def _quantized(model: Any) -> list[Any]:
    return [m for _, m in model.named_modules()
            if type(m) in _PADDED or type(m) in _PADDED.values()]


def pad_products(model: Any, floor: int, kernel: bool = False) -> int:
    """Make every quantized linear layer (and quantized embedding, as a head) of `model`
    multiply a few rows by worker/cuda_rows.py where `kernel` and it applies, else its rows
    as one matrix padded as `rows_for` says (`floor` 1 and no `kernel`: as they come, also
    for layers changed before); returns how many layers do now."""
    changed = 0
    for module in _quantized(model):
        padded = _PADDED.get(type(module), type(module))
        if floor <= 1 and not kernel and type(module) is not padded:
            continue
        module.__class__ = padded
        module.pad_rows = max(1, floor)
        module.rows_kernel = kernel and _covered(module)
        changed += floor > 1 or kernel
    return changed


def set_up(model: Any, floor: int, kernel: bool) -> int:
    """`pad_products` for a shard's model, with the kernels built here, before any step;
    returns the rows a chunk of one sequence is padded to (worker/stage.py `_padding`): 1
    where the kernel computes every product of a few rows, else `floor`."""
    pad_products(model, floor, kernel)
    layers = _quantized(model)
    covered = [m for m in layers if m.rows_kernel] if kernel else []
    if not covered:
        return floor
    try:
        for group_size in sorted({m.group_size for m in covered}):
            cuda_rows.warm(group_size)
    except Exception as e:  # a GPU or toolkit it cannot be built for: MLX's products
        log.warning("the few-rows kernel (worker/cuda_rows.py) could not be built (%s); "
                    "products of a few rows use MLX's kernels", str(e).splitlines()[0][:200])
        pad_products(model, floor, False)
        return floor
    return 1 if len(covered) == len(layers) else floor


def _covered(layer: Any) -> bool:
    return cuda_rows.covers(layer["weight"], layer.get("biases"), layer["scales"].dtype,
                            layer.group_size, layer.bits, getattr(layer, "mode", "affine"))
