"""CUDA backend: a 4-bit product of 2 (or 1) to 8 rows that reads each weight once for all rows.

MLX 0.32's CUDA backend multiplies one row by a 4-bit matrix with `qmv` (a warp per output
feature, 16 weights a lane a turn) and anything else with kernels that cost about M times one
row's for 2 to 7 rows and 3 times from 8 up (bench/RESULTS-gpu.md, "Rows laid out as one
matrix"). Metal has a kernel for a few rows (`qmv_wide`); CUDA has none. This is one: each warp
dequantizes its feature's weights once per turn and multiplies them into every row. On an
H100, 224 chained products of 2, 4 and 8 rows took 7.7, 11.1 and 28.0 ms, against 17.0, 30.7
and 28.2 by MLX and 9.6 for one row (bench/RESULTS-gpu.md, "A kernel for a few rows"). Laid
out as kernels for 1, 2 and 4 rows, more rows in calls of 4: 7.4 ms for one row (MLX: 9.2),
and 19.1 to 24.5 ms for 5 to 8 rows (bench/RESULTS-gpu.md, "Kernel layouts").

One row still goes to MLX's `qmv` by default (`SHARDLINE_ROWS_MIN`, 2; 1 gives it to the
kernel): what the device saves, the host pays back in launching, since each call of a custom
kernel costs the host more than a call of MLX's own product, and a decode step of one stream
is bound by its host on many machines. On one such H100 host, one worker decoded one stream at
134.1 tok/s with one row by `qmv` against 120.3 by the kernel, faster in each of three rounds
(bench/RESULTS-gpu.md, "One row by MLX's product").

Every row's arithmetic is `qmv`'s for that row alone: the same 16 elements a lane, dequantized
with the same bf16 multiply and add, accumulated with bf16 fused multiply-adds in the same
order, summed in float and reduced across the warp the same way. So each row's output is bit
for bit what a product of that row alone gives (`bench/bench_qmm.py --rows` and
tests/test_cuda_rows.py check it on the device; checked on an H100 at group size 64, which
groups of 32 and 128 follow through the same code), and batching rows changes no token.

`applies` says where the kernel computes a product (CUDA, bf16 rows, 4-bit affine weights of a
width that is a multiple of 512, `MIN_ROWS` to 8 rows); elsewhere callers use MLX's product.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

MAX_ROWS = 8  # from 9 rows up MLX's own product costs less (bench/RESULTS-gpu.md)
LANE_ELEMENTS = 16  # qmv's elements per lane for bf16 and 4-bit weights
WARP_ELEMENTS = 32 * LANE_ELEMENTS
WARPS_PER_BLOCK = 8

# Template ints: MB the most rows (the rows, M, come at run time), R features per warp, GS
# group size. Weights are dequantized with a bf16 multiply, then add, as cutlass's arrays in
# qmv do (the compiler fuses them alike: bench/bench_qmm.py checks); the warp's sums are
# reduced by shuffles from 16 lanes apart down. All of it bit-exact against qmv on an H100.
_SOURCE = """
    auto block = cg::this_thread_block();
    auto warp = cg::tiled_partition<32>(block);
    const int M = x_shape[0];
    const int N = w_shape[0];
    const int K = x_shape[1];
    const int first = (blockIdx.y * blockDim.y + threadIdx.y) * R;
    if (first >= N) {
        return;
    }
    const int lane = threadIdx.x;
    const uint8_t* wrow[R];
    const __nv_bfloat16* srow[R];
    const __nv_bfloat16* brow[R];
    #pragma unroll
    for (int f = 0; f < R; ++f) {
        const size_t row = (size_t)min(first + f, N - 1);
        wrow[f] = reinterpret_cast<const uint8_t*>(w) + row * (K / 2);
        srow[f] = scales + row * (K / GS);
        brow[f] = biases + row * (K / GS);
    }
    __nv_bfloat162 acc[R][MB][8];
    const __nv_bfloat162 zero = __floats2bfloat162_rn(0.0f, 0.0f);
    #pragma unroll
    for (int f = 0; f < R; ++f) {
        #pragma unroll
        for (int m = 0; m < MB; ++m) {
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                acc[f][m][j] = zero;
            }
        }
    }
    for (int r = 0; r < K / 512; ++r) {
        const int idx = lane * 16 + r * 512;
        __nv_bfloat162 wd[R][8];
        #pragma unroll
        for (int f = 0; f < R; ++f) {
            const __nv_bfloat16 s = srow[f][idx / GS];
            const __nv_bfloat16 b = brow[f][idx / GS];
            const uint2 packed = *reinterpret_cast<const uint2*>(wrow[f] + idx / 2);
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                const uint32_t word = j < 4 ? packed.x : packed.y;
                const int shift = (j % 4) * 8;
                const __nv_bfloat16 lo = __float2bfloat16_rn((float)((word >> shift) & 0xF));
                const __nv_bfloat16 hi = __float2bfloat16_rn(
                    (float)((word >> (shift + 4)) & 0xF));
                wd[f][j] = __halves2bfloat162(__hadd(__hmul(lo, s), b),
                                              __hadd(__hmul(hi, s), b));
            }
        }
        #pragma unroll
        for (int m = 0; m < MB; ++m) {
            if (m < M) {
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * K + idx);
                const uint4 xa = xp[0];
                const uint4 xb = xp[1];
                const __nv_bfloat162* xv0 = reinterpret_cast<const __nv_bfloat162*>(&xa);
                const __nv_bfloat162* xv1 = reinterpret_cast<const __nv_bfloat162*>(&xb);
                #pragma unroll
                for (int f = 0; f < R; ++f) {
                    #pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        acc[f][m][j] = __hfma2(xv0[j], wd[f][j], acc[f][m][j]);
                        acc[f][m][j + 4] = __hfma2(xv1[j], wd[f][j + 4], acc[f][m][j + 4]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int f = 0; f < R; ++f) {
        #pragma unroll
        for (int m = 0; m < MB; ++m) {
            if (m < M) {
                float sum = 0.0f;
                #pragma unroll
                for (int j = 0; j < 8; ++j) {
                    sum += __low2float(acc[f][m][j]);
                    sum += __high2float(acc[f][m][j]);
                }
                #pragma unroll
                for (int offset = 16; offset > 0; offset /= 2) {
                    sum += warp.shfl_xor(sum, offset);
                }
                if (lane == 0 && first + f < N) {
                    out[(size_t)m * N + first + f] = __float2bfloat16_rn(sum);
                }
            }
        }
    }
"""

# Rows are computed by a kernel built for the next bucket up: one build each (about 1.5 s),
# not one per row count. R features a warp read each row's inputs once for R features; on an
# H100 that was slower at every row count (bench/RESULTS-gpu.md, "A kernel for a few rows"),
# so a warp computes one; SHARDLINE_ROWS_PER_WARP=N measures N (bench/bench_qmm.py sets it here).
# Settings to measure other layouts (bench/bench_qmm.py --rows times them): SHARDLINE_ROWS_BUCKETS
# (the kernels built, e.g. 1,2,3,4,5,6,7,8 for one per count), SHARDLINE_ROWS_MIN=1 (one row
# by the kernel too, with qmv's arithmetic), SHARDLINE_ROWS_SPLIT=N (more rows than N go in calls
# of N: each weight is read once a call, but a call of fewer rows holds fewer accumulators).
# The buckets and the split were the fastest of three layouts at 5 to 8 rows on an H100.


def _setting(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(v) for v in (os.environ.get(name, "").strip() or default).split(","))


BUCKETS = _setting("SHARDLINE_ROWS_BUCKETS", "1,2,4")
PER_WARP = _setting("SHARDLINE_ROWS_PER_WARP", "1")[0]
MIN_ROWS = _setting("SHARDLINE_ROWS_MIN", "2")[0]
SPLIT = _setting("SHARDLINE_ROWS_SPLIT", "4")[0]


_kernel: Any = None


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="shardline_rows_q4", input_names=["x", "w", "scales", "biases"],
            output_names=["out"], source=_SOURCE)
    return _kernel


def enabled() -> bool:
    """Whether products of a few rows go through this kernel: on CUDA, unless
    SHARDLINE_ROWS_KERNEL=0."""
    if os.environ.get("SHARDLINE_ROWS_KERNEL", "").strip() == "0":
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


def applies(x: mx.array) -> bool:
    """Whether `rows_product` takes these rows, with weights it `covers`."""
    k = x.shape[-1]
    return x.dtype == mx.bfloat16 and k > 0 and MIN_ROWS <= x.size // k <= MAX_ROWS


def rows_product(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                 group_size: int) -> mx.array:
    """x @ dequantize(weight).T for x of 1 to 8 rows (any leading shape), 4-bit affine
    weights of shape (N, K / 8); each row exactly as a product of that row alone gives."""
    k = x.shape[-1]
    rows = x.size // k
    n = weight.shape[0]
    flat = x.reshape(rows, k)
    if rows > SPLIT:  # calls of SPLIT rows: each row's arithmetic is its own either way
        out = mx.concatenate([_product(flat[i : i + SPLIT], weight, scales, biases,
                                       group_size) for i in range(0, rows, SPLIT)])
        return out.reshape(*x.shape[:-1], n)
    # the kernel writes row m's feature f at m * N + f: the output takes x's leading shape as
    # it is, with no reshape node for the launch to walk
    return _product(flat, weight, scales, biases, group_size, (*x.shape[:-1], n))


def _product(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
             group_size: int, shape: tuple[int, ...] | None = None) -> mx.array:
    rows, n = x.shape[0], weight.shape[0]
    bucket, per_warp = next(b for b in BUCKETS if b >= rows), PER_WARP
    warps = -(-n // per_warp)
    (out,) = _get_kernel()(
        inputs=[x, weight, scales, biases],
        template=[("MB", bucket), ("R", per_warp), ("GS", group_size)],
        grid=(32, -(-warps // WARPS_PER_BLOCK) * WARPS_PER_BLOCK, 1),
        threadgroup=(32, WARPS_PER_BLOCK, 1),
        output_shapes=[shape or (rows, n)], output_dtypes=[mx.bfloat16])
    return out


def warm(group_size: int) -> None:
    """Build the kernels (about 1.5 s each) before the first step needs one."""
    weight = mx.zeros((8, WARP_ELEMENTS // 8), dtype=mx.uint32)
    scales = mx.zeros((8, WARP_ELEMENTS // group_size), dtype=mx.bfloat16)
    mx.eval([rows_product(mx.zeros((bucket, WARP_ELEMENTS), dtype=mx.bfloat16), weight,
                          scales, scales, group_size)
             for bucket in BUCKETS if MIN_ROWS <= bucket <= SPLIT])
