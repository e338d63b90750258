"""One matrix product of the 8B shape by the number of rows it multiplies: quantized and bf16.

A decode step multiplies one row (one token) by each weight matrix; a speculative check of K
proposals multiplies K + 1 rows, and a batch of B streams B rows. Whether that costs about as
much as one row decides whether checking proposals or batching pays, so this times
`mx.quantized_matmul` (4- and 8-bit, group 64) and a bf16 product of a (1, M, 4096) input with
a 14336 x 4096 weight, for M = 1 ... 64, each evaluated on its own (so every time includes one
launch and sync, the same for every M).

A second table times 224 4-bit products chained in one evaluation (an 8B forward's count, so
launches and syncs weigh as little as in a model), with the rows laid out three ways: one
matrix (1, M, K), as a chunk of one sequence has them; M one-row vectors (M, 1, K), as a
decode step of M sequences has them; and padded to one matrix of 8 rows from 4 (worker/
padding.py `as_one_matrix`, what a worker on CUDA computes from the vectors of M sequences).

A third table (CUDA only) checks worker/cuda_rows.py's kernel for 1 to 8 rows against MLX's
product of each row alone, bit for bit, and times it chained as above: with its settings now
(kernels for 1, 2 and 4 rows, calls of up to 4), with a kernel built for each row count, and
as before (kernels for 2, 4 and 8 rows, calls of up to 8; SHARDLINE_ROWS_BUCKETS,
SHARDLINE_ROWS_SPLIT), beside MLX's one-row product (what one row costs with
SHARDLINE_ROWS_MIN=2).

    python bench/bench_qmm.py            # on the default device (a GPU where MLX has one)
    python bench/bench_qmm.py --rows     # the third table only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import cuda_rows  # noqa: E402
from worker.padding import as_one_matrix  # noqa: E402

D, F = 4096, 14336  # hidden and intermediate sizes of the 8B shape
ROWS = (1, 2, 5, 8, 16, 64)
CHAINED = (1, 2, 3, 4, 5, 8, 16)


def timed(fn, n: int = 50) -> float:
    """Milliseconds per evaluated call, after a warm-up."""
    for _ in range(5):
        mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    w = mx.random.normal((F, D)).astype(mx.bfloat16)
    if "--rows" in sys.argv:
        if not cuda_rows.enabled():
            sys.exit("--rows: worker/cuda_rows.py's kernel runs on CUDA only "
                     "(and not with SHARDLINE_ROWS_KERNEL=0)")
        rows_kernel(w)
        return
    print(f"device {mx.default_device()}, weight {F} x {D}, ms per product (with its sync)")
    print("| weights | " + " | ".join(f"M = {m}" for m in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    for bits in (4, 8):
        wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        cells = []
        for m in ROWS:
            x = mx.random.normal((1, m, D)).astype(mx.bfloat16)
            cells.append(timed(lambda x=x, q=(wq, scales, biases), bits=bits: mx.quantized_matmul(
                x, *q, transpose=True, group_size=64, bits=bits)))
        print(f"| {bits}-bit | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    cells = []
    for m in ROWS:
        x = mx.random.normal((1, m, D)).astype(mx.bfloat16)
        cells.append(timed(lambda x=x: x @ w.T))
    print("| bf16 | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    chained(w)
    if cuda_rows.enabled():
        rows_kernel(w)


def chained(w: mx.array) -> None:
    """ms per 224 chained 4-bit products (up and down, 112 times), by layout of the M rows."""
    up = mx.quantize(w * 0.02, group_size=64, bits=4)
    down = mx.quantize(w.T * 0.02, group_size=64, bits=4)
    mx.eval(*up, *down)

    def product(x: mx.array, q: tuple) -> mx.array:
        return mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4)

    def layouts(m: int):
        return {"one matrix (1, M, K)": lambda x, q: product(x, q),
                "M vectors (M, 1, K)": lambda x, q: product(x.reshape(m, 1, -1), q).reshape(
                    1, m, -1),
                "as a CUDA worker computes it": lambda x, q: as_one_matrix(
                    lambda y: product(y, q), x.reshape(m, 1, -1), 8).reshape(1, m, -1)}

    print("\n224 chained 4-bit products (up and down), ms per evaluation, M = "
          + ", ".join(map(str, CHAINED)))
    print("| layout | " + " | ".join(f"M = {m}" for m in CHAINED) + " |")
    print("|---|" + "---|" * len(CHAINED))
    for name in layouts(1):
        cells = []
        for m in CHAINED:
            f = layouts(m)[name]
            x = mx.random.normal((1, m, D)).astype(mx.bfloat16)

            def chain(x=x, f=f):
                for _ in range(112):
                    x = f(f(x, up), down)
                return x
            cells.append(timed(chain, n=5))
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def rows_kernel(w: mx.array) -> None:
    """worker/cuda_rows.py: bit-exact against one row at a time (1 to 8 rows); then timed
    chained as above in the layouts its settings choose, beside MLX's one-row product."""
    shapes = {"up": mx.quantize(w * 0.02, group_size=64, bits=4),
              "down": mx.quantize(w.T * 0.02, group_size=64, bits=4),
              "1030 x 512": mx.quantize(w[:1030, :512], group_size=64, bits=4)}
    counts = tuple(range(1, cuda_rows.MAX_ROWS + 1))
    t0 = time.perf_counter()
    cuda_rows.warm(64)
    print(f"\nkernels built (worker/cuda_rows.py warm): {(time.perf_counter() - t0):.1f} s")
    print("worker/cuda_rows.py against MLX's product of each row alone: elements that differ")
    print("| weight | " + " | ".join(f"M = {m}" for m in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, q in shapes.items():
        cells = []
        for m in counts:
            x = mx.random.normal((m, q[0].shape[1] * 8)).astype(mx.bfloat16)
            alone = mx.concatenate([mx.quantized_matmul(
                x[i:i + 1], *q, transpose=True, group_size=64, bits=4) for i in range(m)])
            cells.append(int(mx.sum(cuda_rows.rows_product(x, *q, 64) != alone).item()))
        print(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    up, down = shapes["up"], shapes["down"]
    xs = {m: mx.random.normal((m, D)).astype(mx.bfloat16) for m in counts}

    def mlx_one(x=xs[1]):
        for _ in range(112):
            x = mx.quantized_matmul(mx.quantized_matmul(x, *up, transpose=True, group_size=64,
                                                        bits=4),
                                    *down, transpose=True, group_size=64, bits=4)
        return x

    print(f"224 chained products, ms; MLX's one row (qmv): {timed(mlx_one, n=5):.2f}")
    print("| layout | " + " | ".join(f"M = {m}" for m in counts) + " |")
    print("|---|" + "---|" * len(counts))
    default = (cuda_rows.BUCKETS, cuda_rows.SPLIT)
    layouts = {f"kernels for {','.join(map(str, default[0]))} rows, calls of up to "
               f"{default[1]} (the settings now)": default,
               "a kernel for each count": (counts, cuda_rows.MAX_ROWS),
               "kernels for 2,4,8 rows, calls of up to 8 (before)": ((2, 4, 8), 8)}
    for name, (buckets, split) in layouts.items():
        cuda_rows.BUCKETS, cuda_rows.SPLIT = buckets, split
        cells = []
        for m in counts:
            def chain(x=xs[m]):
                for _ in range(112):
                    x = cuda_rows.rows_product(cuda_rows.rows_product(x, *up, 64), *down, 64)
                return x
            cells.append(timed(chain, n=5))  # its warm-up builds a kernel not built yet
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
    cuda_rows.BUCKETS, cuda_rows.SPLIT = default


if __name__ == "__main__":
    main()
