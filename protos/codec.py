"""Tensor codec: MLX arrays to raw bytes with dtype and shape and back, bit-exact (bf16 too)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from protos import worker_pb2

# bf16 has no numpy dtype: it travels as its uint16 bit pattern and is viewed back on arrival.
_WIRE = {
    "bfloat16": (mx.uint16, np.uint16),
    "float16": (mx.float16, np.float16),
    "float32": (mx.float32, np.float32),
    "int32": (mx.int32, np.int32),
    "uint32": (mx.uint32, np.uint32),
}
_MX = {
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
    "int32": mx.int32,
    "uint32": mx.uint32,
}


def dtype_name(dtype: mx.Dtype) -> str:
    """'bfloat16' for mx.bfloat16, and so on."""
    return str(dtype).removeprefix("mlx.core.")


def encode(array: mx.array) -> worker_pb2.Tensor:
    """Pack an evaluated array into a Tensor message without converting its values."""
    return encode_into(worker_pb2.Tensor(), array)


def wire(array: mx.array) -> mx.array:
    """`array` as its bytes travel (bf16 as its uint16 bits), lazily: evaluated with the
    values, it gives `encode_into` the bytes without another evaluation (on a GPU, a sync)."""
    return array.view(mx.uint16) if array.dtype == mx.bfloat16 else array


def encode_into(tensor: worker_pb2.Tensor, array: mx.array,
                wired: mx.array | None = None) -> worker_pb2.Tensor:
    """Fill `tensor` (a field of a message being built) with an evaluated array's bytes
    (read from `wired`, its evaluated `wire` form, where given)."""
    name = dtype_name(array.dtype)
    if name not in _WIRE:
        raise ValueError(f"dtype {name} cannot travel on the wire")
    # bf16 has no buffer format: its bits go out as uint16 (memoryview reads a view directly)
    view = wired if wired is not None else wire(array)
    tensor.data = bytes(memoryview(view))
    del tensor.shape[:]
    tensor.shape.extend(array.shape)
    tensor.dtype = name
    return tensor


def decode(tensor: worker_pb2.Tensor) -> mx.array:
    """Rebuild the array a Tensor message carries (same bits, dtype and shape)."""
    if tensor.dtype not in _WIRE:
        raise ValueError(f"unknown tensor dtype {tensor.dtype!r}")
    mx_wire, np_wire = _WIRE[tensor.dtype]
    flat = np.frombuffer(tensor.data, dtype=np_wire)
    expected = int(np.prod(tensor.shape)) if tensor.shape else 1
    if flat.size != expected:
        raise ValueError(f"tensor has {flat.size} values for shape {list(tensor.shape)}")
    array = mx.array(flat.reshape(tuple(tensor.shape)))
    return array.view(_MX[tensor.dtype]) if tensor.dtype == "bfloat16" else array


def placeholder(shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """An evaluated zero array of `shape` and `dtype`, and a writable numpy view of its buffer
    (bf16 as its uint16 bits): a graph built on the array now reads what `fill` writes into
    the view before the graph is evaluated."""
    name = dtype_name(dtype)
    if name not in _WIRE:
        raise ValueError(f"dtype {name} cannot travel on the wire")
    # built from host values, so already evaluated: no sync with the device (bf16: its bits
    # are, and the array is a lazy view of them that a graph reads when it runs)
    bits = mx.array(np.zeros(shape, dtype=_WIRE[name][1]))
    array = bits.view(dtype) if name == "bfloat16" else bits
    view = np.asarray(bits)
    if not view.flags.writeable:
        raise ValueError("this MLX backend gives no writable view of an array's buffer")
    return array, view


def fill(view: np.ndarray, tensor: worker_pb2.Tensor) -> bool:
    """Write a Tensor message's values into a placeholder's view (`placeholder`); False, and
    nothing written, when its dtype, shape or byte count differ from the placeholder's."""
    wire = _WIRE.get(tensor.dtype)
    if wire is None or wire[1] != view.dtype or tuple(tensor.shape) != view.shape or \
            len(tensor.data) != view.nbytes:
        return False
    view[...] = np.frombuffer(tensor.data, dtype=wire[1]).reshape(view.shape)
    return True

