"""mlx-lm's decode beside idle processes on the same GPU: plain MLX ones, and idle clusters.

On a GPU machine, one worker decoded at 1.00x of mlx-lm with only its own cluster up and at
0.76x with a 2- and a 4-worker cluster idle beside it, and mlx-lm's own gaps between tokens
grew then too (bench/RESULTS-gpu.md). This tells whether processes that merely hold a model on
the GPU do that (an effect of MLX and the driver), or Shardline's idle workers do (one of ours):

- `alone`: mlx-lm with nothing else on the GPU;
- `beside idle clusters`: a 4-worker and a 2-worker cluster, started, warmed up, idle;
- `beside N idle MLX processes`: each has loaded the model with mlx-lm, decoded 4 tokens and
  sleeps; then `alone again`.

    python bench/bench_neighbours.py --gpu       # the 8B-shaped 4-bit llama
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_hotpath import GPU_SPEC, start_cluster  # noqa: E402
from bench_serving import bench_mlx_lm, bench_shardline  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402

IDLE = """
import sys, time
from mlx_lm import generate, load
model, tokenizer = load(sys.argv[1])
generate(model, tokenizer, "hello", max_tokens=4)
print("ready", flush=True)
time.sleep(3600)
"""


def measure(path: Path, label: str, runs: int) -> None:
    results = [bench_mlx_lm(path, 1, 64, 128) for _ in range(runs)]
    itl = [x for r in results for x in r.itl]
    print(f"| {label} | {statistics.median(r.tps for r in results):.1f} | "
          f"{results[0].pct(itl, 0.5) * 1e3:.2f} | {results[0].pct(itl, 0.9) * 1e3:.2f} | "
          f"{max(itl) * 1e3:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 8B shape (bench_hotpath's)")
    parser.add_argument("--idle", type=int, default=6, help="idle MLX processes")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    path = cached_model(GPU_SPEC if args.gpu else bench_serving.SPEC)
    print(f"model {path.name}, mlx-lm one stream, prompt 64, 128 new tokens, {args.runs} runs "
          "a row")
    print("| mlx-lm | tok/s | ITL p50 ms | ITL p90 ms | ITL max ms |")
    print("|---|---|---|---|---|")
    measure(path, "alone", args.runs)

    async def clusters() -> None:
        up = []
        try:
            for workers in (4, 2):
                up.append(await start_cluster(path, workers, 1, False))
                await bench_shardline(up[-1][1], f"{workers} workers", 1, 64, 16)
            t0 = time.perf_counter()
            await asyncio.to_thread(measure, path, "beside idle 4- and 2-worker clusters",
                                    args.runs)
            print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            for local, coord in up:
                await coord.stop()
                local.stop()

    asyncio.run(clusters())

    idle = [subprocess.Popen([sys.executable, "-c", IDLE, str(path)], stdout=subprocess.PIPE,
                             text=True) for _ in range(args.idle)]
    try:
        for proc in idle:  # each has loaded the model and decoded
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("an idle MLX process did not start")
        measure(path, f"beside {args.idle} idle MLX processes", args.runs)
    finally:
        for proc in idle:
            proc.kill()
            proc.wait()
    measure(path, "alone again", args.runs)


if __name__ == "__main__":
    main()
