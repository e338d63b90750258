"""CUDA backend: a 4-bit product of 2 to 16 rows that reads each weight once for all rows.

MLX 0.32's CUDA backend multiplies one row by a 4-bit matrix with `qmv` (a warp per output
feature, 16 weights a lane a turn) and anything else with kernels that cost about M times one
row's for 2 to 7 rows and 3 times from 8 up (bench/RESULTS-gpu.md, "Rows laid out as one
matrix"). Metal has a kernel for a few rows (`qmv_wide`); CUDA has none. This is one: each warp
dequantizes its feature's weights once per turn and multiplies them into every row.

Every row's arithmetic is `qmv`'s for that row alone: the same 16 elements a lane, dequantized
with the same rounded bf16 multiply and add, accumulated with bf16 fused multiply-adds in the
same order, summed in float and reduced across the warp the same way. So each row's output is
bit for bit what a product of that row alone gives (checked on the device by
`bench/bench_qmm.py`, whose third table times it), and batching rows changes no token.

`rows_product` returns None where the kernel does not apply (not CUDA, not bf16, not 4-bit
affine, a width that is not a multiple of 512, one row or more than 16); callers then use
MLX's product.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

MAX_ROWS = 16  # accumulators are 8 registers a row
LANE_ELEMENTS = 16  # qmv's elements per lane for bf16 and 4-bit weights
WARP_ELEMENTS = 32 * LANE_ELEMENTS
WARPS_PER_BLOCK = 8

_HEADER = """
#include <cooperative_groups/reduce.h>
"""

# Template ints: M rows, GS group size; DEQ and RED pick how weights are dequantized and sums
# reduced (DEQ 0: bf16 multiply, then add, as cutlass's arrays do them, which the compiler may
# fuse; 1: one fused multiply-add; 2: multiply and add each rounded. RED 0: cooperative
# groups' reduce; 1: shuffles from 16 lanes apart down). One warp per feature.
_SOURCE = """
    auto block = cg::this_thread_block();
    auto warp = cg::tiled_partition<32>(block);
    const int N = w_shape[0];
    const int K = x_shape[1];
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= N) {
        return;
    }
    const int lane = threadIdx.x;
    const uint8_t* wrow = reinterpret_cast<const uint8_t*>(w) + (size_t)row * (K / 2);
    const __nv_bfloat16* srow = scales + (size_t)row * (K / GS);
    const __nv_bfloat16* brow = biases + (size_t)row * (K / GS);
    __nv_bfloat162 acc[M][8];
    const __nv_bfloat162 zero = __floats2bfloat162_rn(0.0f, 0.0f);
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[m][j] = zero;
        }
    }
    for (int r = 0; r < K / 512; ++r) {
        const int idx = lane * 16 + r * 512;
        const __nv_bfloat162 s2 = __bfloat162bfloat162(srow[idx / GS]);
        const __nv_bfloat162 b2 = __bfloat162bfloat162(brow[idx / GS]);
        const uint2 packed = *reinterpret_cast<const uint2*>(wrow + idx / 2);
        __nv_bfloat162 wd[8];
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint32_t word = j < 4 ? packed.x : packed.y;
            const int shift = (j % 4) * 8;
            const float lo = (float)((word >> shift) & 0xF);
            const float hi = (float)((word >> (shift + 4)) & 0xF);
            __nv_bfloat162 q = __floats2bfloat162_rn(lo, hi);
            if constexpr (DEQ == 0) {
                wd[j] = __halves2bfloat162(__hadd(__hmul(q.x, s2.x), b2.x),
                                           __hadd(__hmul(q.y, s2.y), b2.y));
            } else if constexpr (DEQ == 1) {
                wd[j] = __hfma2(q, s2, b2);
            } else {
                wd[j] = __hadd2_rn(__hmul2_rn(q, s2), b2);
            }
        }
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * K + idx);
            const uint4 xa = xp[0];
            const uint4 xb = xp[1];
            const __nv_bfloat162* xv0 = reinterpret_cast<const __nv_bfloat162*>(&xa);
            const __nv_bfloat162* xv1 = reinterpret_cast<const __nv_bfloat162*>(&xb);
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc[m][j] = __hfma2(xv0[j], wd[j], acc[m][j]);
                acc[m][j + 4] = __hfma2(xv1[j], wd[j + 4], acc[m][j + 4]);
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        float sum = 0.0f;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            sum += __low2float(acc[m][j]);
            sum += __high2float(acc[m][j]);
        }
        if constexpr (RED == 0) {
            sum = cg::reduce(warp, sum, cg::plus<float>());
        } else {
            #pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) {
                sum += warp.shfl_xor(sum, offset);
            }
        }
        if (lane == 0) {
            out[(size_t)m * N + row] = __float2bfloat16_rn(sum);
        }
    }
"""

_kernel: Any = None


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="shardline_rows_q4", input_names=["x", "w", "scales", "biases"],
            output_names=["out"], source=_SOURCE, header=_HEADER)
    return _kernel


def enabled() -> bool:
    """Whether products of a few rows go through this kernel: on CUDA, with
    SHARDLINE_ROWS_KERNEL=1 (not yet measured on a device: off by default)."""
    if os.environ.get("SHARDLINE_ROWS_KERNEL", "").strip() != "1":
        return False
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and hasattr(cuda, "is_available") and cuda.is_available())


def covers(weight: mx.array, biases: Any, dtype: Any, group_size: int, bits: int,
           mode: str = "affine") -> bool:
    """Whether `rows_product` computes products of bf16 rows with these weights (`dtype`:
    their scales')."""
    return (bits == 4 and mode == "affine" and biases is not None and dtype == mx.bfloat16
            and group_size in (32, 64, 128) and weight.ndim == 2
            and weight.dtype == mx.uint32 and (weight.shape[-1] * 8) % WARP_ELEMENTS == 0)


def applies(x: mx.array, weight: mx.array, scales: mx.array, biases: Any, group_size: int,
            bits: int, mode: str = "affine") -> bool:
    """Whether `rows_product` computes x @ dequantize(weight).T for these operands."""
    k = x.shape[-1]
    rows = x.size // k if k else 0
    return (2 <= rows <= MAX_ROWS and x.dtype == mx.bfloat16 and weight.ndim == 2
            and weight.shape[-1] * 8 == k
            and covers(weight, biases, scales.dtype, group_size, bits, mode))


# (DEQ, RED) of _SOURCE: the one equal to MLX's qmv on the device; SHARDLINE_ROWS_VARIANT
# ("01", say) picks another to measure it
VARIANT = tuple(int(c) for c in os.environ.get("SHARDLINE_ROWS_VARIANT", "00")[:2])


def rows_product(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                 group_size: int, variant: tuple[int, int] = VARIANT) -> mx.array:
    """x @ dequantize(weight).T for x of 2 to 16 rows (any leading shape), 4-bit affine
    weights of shape (N, K / 8); each row exactly as a product of that row alone gives."""
    k = x.shape[-1]
    rows = x.size // k
    n = weight.shape[0]
    flat = x.reshape(rows, k)
    (out,) = _get_kernel()(
        inputs=[flat, weight, scales, biases],
        template=[("M", rows), ("GS", group_size), ("DEQ", variant[0]), ("RED", variant[1])],
        grid=(32, -(-n // WARPS_PER_BLOCK) * WARPS_PER_BLOCK, 1),
        threadgroup=(32, WARPS_PER_BLOCK, 1),
        output_shapes=[(rows, n)], output_dtypes=[mx.bfloat16])
    return out.reshape(*x.shape[:-1], n)
