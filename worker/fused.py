"""One product for the quantized layers that read the same input: q, k and v; gate and up.

mlx-lm's attention multiplies its input by three quantized weights (`q_proj`, `k_proj`,
`v_proj`) and its MLP by two (`gate_proj`, `up_proj`), each product a kernel of its own. On a
fast GPU a decode step's time on a stage is mostly launching its kernels (bench/RESULTS-gpu.md),
and a stage's launch lies on the token's path, so fewer kernels a layer make each hop cheaper.
`fuse` concatenates each such group's weights (rows of one matrix: scales, biases and any
bias alike) into one layer, and the group's layers become parts of it: the first part called
with an input computes the whole product and splits it by columns, the others take theirs.

Only where every output feature of the product is computed alone, in an order that does not
depend on the other features, is this the same bits as the separate products: one row (MLX's
`qmv` on CUDA and Metal, the CPU's loop over features) and the rows of worker/cuda_rows.py's
kernel (a warp a feature). Other inputs (prompt chunks) go through each part's own rows of the
concatenated weights, as the layer did before: same arrays, same kernels. So nothing that
comes out changes (tests/test_fused.py; the parity tests run with it).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from worker import cuda_rows

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SETTINGS = ("pad_rows", "rows_kernel")  # worker/padding.py's, kept on the layers made here


class _Shared:
    """A group's concatenated layer, its parts' layers on their own rows, and the last
    product (one input is multiplied once)."""

    def __init__(self, layer: Any, views: list[Any]) -> None:
        self.layer = layer
        self.views = views
        sizes = [v["weight"].shape[0] for v in views]
        self.bounds = list(itertools.accumulate([0, *sizes]))
        self._x: mx.array | None = None
        self._parts: list[mx.array] = []

    def product(self, index: int, x: mx.array) -> mx.array:
        if not _whole(self.layer, x):
            return self.views[index](x)
        if x is not self._x:  # one split for all the parts: one node, not one a part
            self._x = x
            self._parts = mx.split(self.layer(x), self.bounds[1:-1], axis=-1)
        return self._parts[index]


class FusedPart(nn.Module):
    """One layer of a fused group: its columns of the group's product. Holds no parameters
    (the group's concatenated layer is a sibling module, `<first>_fused`)."""

    def __init__(self, shared: _Shared, index: int) -> None:
        super().__init__()
        self.shared = shared  # a plain object: not in the module's parameter tree
        self.index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self.shared.product(self.index, x)


def _whole(layer: Any, x: mx.array) -> bool:
    """Whether the concatenated product gives each feature what its own layer would."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    return rows == 1 or bool(getattr(layer, "rows_kernel", False) and cuda_rows.applies(x))


def _quantized(layer: Any) -> bool:
    return isinstance(layer, nn.QuantizedLinear) and "weight" in layer


def _key(layer: Any) -> tuple:
    """What layers must share to be multiplied as one."""
    return (type(layer), layer.group_size, layer.bits, getattr(layer, "mode", "affine"),
            layer["weight"].shape[1], layer["weight"].dtype, layer["scales"].dtype,
            layer.get("biases") is None, "bias" in layer,
            tuple(getattr(layer, s, None) for s in _SETTINGS))


def _like(template: Any, weight: mx.array, scales: mx.array, biases: mx.array | None,
          bias: mx.array | None) -> Any:
    """A layer of `template`'s class and settings on these arrays (nothing drawn at random)."""
    cls = type(template)
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.group_size, layer.bits = template.group_size, template.bits
    layer.mode = getattr(template, "mode", "affine")
    layer.weight, layer.scales, layer.biases = weight, scales, biases
    if bias is not None:
        layer.bias = bias
    for setting in _SETTINGS:
        if setting in vars(template):
            setattr(layer, setting, getattr(template, setting))
    layer.freeze()
    return layer


def _fuse_group(owner: Any, names: tuple[str, ...]) -> bool:
    layers = [owner.get(n) for n in names]
    if not all(_quantized(m) and not isinstance(m, FusedPart) for m in layers):
        return False
    if len({_key(m) for m in layers}) != 1:
        return False
    if any(m["weight"].shape[0] % 8 for m in layers):  # Metal picks its one-row kernel by
        return False  # the features' count being a multiple of 8: the same for each part

    def joined(name: str) -> mx.array | None:
        parts = [m.get(name) for m in layers]
        return None if parts[0] is None else mx.concatenate(parts, axis=0)

    first = layers[0]
    bias = joined("bias") if "bias" in first else None
    whole = _like(first, joined("weight"), joined("scales"), joined("biases"), bias)
    mx.eval(whole.parameters())
    views, start = [], 0
    for m in layers:
        rows = slice(start, start + m["weight"].shape[0])
        start = rows.stop
        views.append(_like(m, whole["weight"][rows], whole["scales"][rows],
                           None if whole.get("biases") is None else whole["biases"][rows],
                           None if bias is None else whole["bias"][rows]))
    mx.eval([v.parameters() for v in views])  # views of the concatenated buffers
    shared = _Shared(whole, views)
    setattr(owner, f"{names[0]}_fused", whole)
    for i, name in enumerate(names):
        setattr(owner, name, FusedPart(shared, i))
    return True


def fuse(model: Any) -> int:
    """Multiply each group of quantized layers that read one input (`GROUPS`) as one layer,
    in every module of `model` that has one; returns how many groups were fused (a group
    fused before, or whose layers differ in kind or settings, stays as it is). Call after
    worker/padding.py's `set_up`: the layers made here keep its settings. SHARDLINE_FUSE=0
    turns it off."""
    if os.environ.get("SHARDLINE_FUSE", "").strip() == "0":  # off, to measure without
        return 0
    fused = 0
    for module in [m for _, m in model.named_modules()]:  # changed below: listed first
        for names in GROUPS:
            if all(n in module for n in names):
                fused += _fuse_group(module, names)
    return fused
