"""Page-locked host buffers a kernel reads a slice's input from or writes its output to (CUDA).

bench/bench_gpu_wait.py's `pinned` modes: MLX 0.32's CUDA backend keeps arrays made from host
values in managed memory, and gives the host a device array by allocating managed memory and
copying into it, synchronously, each time (mlx/backend/cuda/allocator.cpp
`move_to_unified_memory`). A pipeline stage does both every token. Here the bytes go instead
through page-locked buffers made once (the CUDA driver's `cuMemHostAlloc`), which a kernel
reads or writes over the bus directly. On an H100 that saved 0.1 ms of a 16-layer slice and
nothing measurable in a pipeline of 2 workers (bench/RESULTS-gpu.md, "Activations through
page-locked buffers"), so the stages keep MLX's way.

`HostBuffer` is one such buffer: `view` is its numpy view; `read` is a lazy array that copies
its bytes onto the GPU; `write(array)` is a lazy array whose evaluation leaves `array`'s bytes
in `view`.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import mlx.core as mx
import numpy as np

_PORTABLE, _DEVICEMAP = 0x01, 0x02  # cuMemHostAlloc flags
_BLOCK = 256

# The host pointer comes in two template ints (its bits from 31 up, and below); 16 bytes a
# thread a turn, the last NBYTES % 16 bytes by one thread.
_ADDRESS = """
    unsigned char* host = reinterpret_cast<unsigned char*>(
        ((unsigned long long)HI << 31) | (unsigned long long)LO);
"""
_LOOP = """
    const int whole = NBYTES / 16;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < whole; i += gridDim.x * blockDim.x) {
        reinterpret_cast<uint4*>(DST)[i] = reinterpret_cast<const uint4*>(SRC)[i];
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        for (int i = whole * 16; i < NBYTES; ++i) {
            reinterpret_cast<unsigned char*>(DST)[i] =
                reinterpret_cast<const unsigned char*>(SRC)[i];
        }
    }
"""
_FROM_HOST = _ADDRESS + _LOOP.replace("DST", "out").replace("SRC", "host")
_TO_HOST = _ADDRESS + _LOOP.replace("DST", "host").replace("SRC", "src") + """
    __threadfence_system();
"""


class _Driver:
    """The few CUDA driver calls a page-locked buffer needs, on MLX's device's primary
    context."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device),
                    "cuDevicePrimaryCtxRetain")

    @staticmethod
    def _check(code: int, call: str) -> None:
        if code != 0:
            raise RuntimeError(f"CUDA driver call {call} failed with error {code}")

    def host_alloc(self, nbytes: int) -> int:
        """A page-locked host buffer the GPU reads and writes at the same address."""
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        host = ctypes.c_void_p()
        self._check(self.lib.cuMemHostAlloc(ctypes.byref(host), ctypes.c_size_t(nbytes),
                                            _PORTABLE | _DEVICEMAP), "cuMemHostAlloc")
        device = ctypes.c_uint64()
        self._check(self.lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device), host, 0),
                    "cuMemHostGetDevicePointer")
        if device.value != host.value:  # unified addressing: one address for both
            raise RuntimeError("the GPU sees page-locked memory at another address")
        return host.value


_driver: _Driver | None = None
_kernels: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    if name not in _kernels:
        source, inputs = (_FROM_HOST, ["anchor"]) if name == "from" else (_TO_HOST, ["src"])
        _kernels[name] = mx.fast.cuda_kernel(name=f"shardline_{name}_host", input_names=inputs,
                                             output_names=["out"], source=source)
    return _kernels[name]


class HostBuffer:
    """A page-locked host buffer of one shape and dtype that a step reads its input from or
    writes its output to (module docstring). Freed with the process."""

    def __init__(self, shape: tuple[int, ...], dtype: mx.Dtype) -> None:
        global _driver
        if _driver is None:
            _driver = _Driver()
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = math.prod(shape) * dtype.size
        self.address = _driver.host_alloc(max(self.nbytes, 16))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.address)
        self.bytes = np.ctypeslib.as_array(raw)
        self.view = self.bytes.view(np.uint16 if dtype == mx.bfloat16 else
                                    np.dtype(str(dtype).removeprefix("mlx.core.")))
        self.view = self.view.reshape(self.shape)
        # template ints are 32-bit and name the kernel: two non-negative parts of 31 bits
        self._template = [("HI", self.address >> 31), ("LO", self.address & 0x7FFFFFFF),
                          ("NBYTES", self.nbytes)]
        self._grid = (max(1, min(64, -(-self.nbytes // (16 * _BLOCK)))) * _BLOCK, 1, 1)
        self._anchor = mx.zeros((1,), mx.uint32)
        mx.eval(self._anchor)

    def read(self) -> mx.array:
        """A lazy array of the buffer's shape and dtype holding, once evaluated, the bytes
        the host wrote into `view` before the evaluation was launched."""
        (out,) = _kernel("from")(inputs=[self._anchor], template=self._template,
                                 grid=self._grid, threadgroup=(_BLOCK, 1, 1),
                                 output_shapes=[self.shape], output_dtypes=[self.dtype])
        return out

    def write(self, array: mx.array) -> mx.array:
        """A lazy one-element array whose evaluation leaves `array`'s bytes in `view`."""
        if tuple(array.shape) != self.shape or array.dtype != self.dtype:
            raise ValueError(f"a {array.dtype} array of shape {tuple(array.shape)} does not "
                             f"fit a {self.dtype} buffer of shape {self.shape}")
        (done,) = _kernel("to")(inputs=[array], template=self._template, grid=self._grid,
                                threadgroup=(_BLOCK, 1, 1), output_shapes=[(1,)],
                                output_dtypes=[mx.uint32])
        return done

