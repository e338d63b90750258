"""Per-token overhead benchmark: one greedy stream, tiny model, mlx-lm vs Shardline 1 and 2 workers.

The model is so small that a token costs well under a millisecond of compute, so the inter-token
latency (ITL) is almost all software: gRPC, protobuf, asyncio, threads, detokenizing, metrics.
Measures ITL p50/p99 and tokens/s of (a) mlx-lm `stream_generate` in a subprocess, (b) Shardline
with one worker, (c) Shardline with two workers, each warmed up with the same shapes and run
`--runs` times (medians reported), and prints the per-token overhead (b)-(a) and (c)-(a).

    python bench/bench_overhead.py               # about a minute on 2 CPU cores
    python bench/bench_overhead.py --runs 1 --new 64
    python bench/bench_overhead.py --pin         # pin as bench_serving does (core i per worker)
    python bench/bench_overhead.py --secret      # also (b) and (c) with a cluster secret
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_serving import Result, bench_mlx_lm, bench_shardline, with_cluster  # noqa: E402

from coordinator.demo import ModelSpec, cached_model  # noqa: E402

SPEC = ModelSpec(family="llama", num_layers=4, hidden_size=128, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=4096)
PROMPT = 32


def summary(runs: list[Result]) -> dict[str, float]:
    """Medians over runs of ITL p50/p99 (ms) and tokens/s."""
    return {
        "p50": statistics.median(r.pct(r.itl, 0.5) for r in runs) * 1e3,
        "p99": statistics.median(r.pct(r.itl, 0.99) for r in runs) * 1e3,
        "tps": statistics.median(r.tps for r in runs),
    }


async def shardline(path: Path, workers: int, runs: int, new: int) -> list[Result]:
    """Start a cluster of `workers`, warm it up with the timed shapes, then time `runs` runs."""
    async def fn(coord) -> list[Result]:
        label = f"shardline {workers} worker{'s' if workers > 1 else ''}"
        await bench_shardline(coord, label, 1, PROMPT, new)  # a whole warm-up run
        return [await bench_shardline(coord, label, 1, PROMPT, new, warm=False)
                for _ in range(runs)]

    return await with_cluster(path, workers, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=256, help="new tokens per run")
    parser.add_argument("--pin", action="store_true",
                        help="pin mlx-lm to core 0 and worker i to core i")
    parser.add_argument("--secret", action="store_true",
                        help="also run (b) and (c) with a cluster secret (signed calls)")
    args = parser.parse_args()
    bench_serving.PIN = args.pin
    path = cached_model(SPEC)
    results = {
        "(a) mlx-lm": [bench_mlx_lm(path, 1, PROMPT, args.new) for _ in range(args.runs)],
        "(b) shardline 1 worker": asyncio.run(shardline(path, 1, args.runs, args.new)),
        "(c) shardline 2 workers": asyncio.run(shardline(path, 2, args.runs, args.new)),
    }
    if args.secret:
        bench_serving.SECRET = b"a-benchmark-cluster-secret"
        results["(b) 1 worker, secret"] = asyncio.run(shardline(path, 1, args.runs, args.new))
        results["(c) 2 workers, secret"] = asyncio.run(shardline(path, 2, args.runs, args.new))
    stats = {k: summary(v) for k, v in results.items()}
    print(f"model {SPEC.key()}, prompt {PROMPT}, {args.new} new tokens, greedy, 1 stream, "
          f"medians of {args.runs} runs")
    print("| system | ITL p50 ms | ITL p99 ms | tokens/s |")
    print("|---|---|---|---|")
    for label, s in stats.items():
        print(f"| {label} | {s['p50']:.3f} | {s['p99']:.3f} | {s['tps']:.0f} |")
    a = stats["(a) mlx-lm"]["p50"]
    b = stats["(b) shardline 1 worker"]["p50"]
    c = stats["(c) shardline 2 workers"]["p50"]
    print(f"per-token overhead (ITL p50): (b)-(a) {b - a:.3f} ms, (c)-(a) {c - a:.3f} ms, "
          f"extra hop (c)-(b) {c - b:.3f} ms")
    if args.secret:
        bs = stats["(b) 1 worker, secret"]["p50"]
        cs = stats["(c) 2 workers, secret"]["p50"]
        print(f"cost of the cluster secret (ITL p50): 1 worker {bs - b:+.3f} ms, "
              f"2 workers {cs - c:+.3f} ms")


if __name__ == "__main__":
    main()
