"""One matrix product of the 8B shape by the number of rows it multiplies: quantized and bf16.

A decode step multiplies one row (one token) by each weight matrix; a speculative check of K
proposals multiplies K + 1 rows, and a batch of B streams B rows. Whether that costs about as
much as one row decides whether checking proposals or batching pays, so this times
`mx.quantized_matmul` (4- and 8-bit, group 64) and a bf16 product of a (1, M, 4096) input with
a 14336 x 4096 weight, for M = 1 ... 64, each evaluated on its own (so every time includes one
launch and sync, the same for every M).

    python bench/bench_qmm.py        # on the default device (a GPU where MLX has one)
"""

from __future__ import annotations

import time

import mlx.core as mx

D, F = 4096, 14336  # hidden and intermediate sizes of the 8B shape
ROWS = (1, 2, 5, 8, 16, 64)


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


if __name__ == "__main__":
    main()
