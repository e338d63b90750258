"""Build the GPU benchmarks' 8B-shaped models ahead, so bench runs start at once.

`bench_hotpath.py --gpu` and `bench_speculation.py --gpu` each build their model on the CPU
the first time (139 s for the plain one on an H100 box), inside their own time limit. This
builds both (and the speculation draft) in a call of their own and says how long each took.

    python bench/prebuild.py                      # on the GPU box: bench/gpu.sh prebuild -
    python bench/prebuild.py --quiet-scale 0.003  # the speculation target at that scale
    python bench/prebuild.py --side-by-side       # both at once (by estimate up to 100 GB of
                                                  # memory; not yet tried on a device)
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_hotpath  # noqa: E402
import bench_speculation  # noqa: E402

from coordinator.demo import ModelSpec, cached_model, draft_model  # noqa: E402


def build(spec: ModelSpec, draft: bool) -> str:
    """Build `spec` (and its draft) into the cache; a line saying where and how long."""
    t0 = time.perf_counter()
    path = cached_model(spec)
    if draft:
        draft_model(path, spec.quiet_after)
    return f"{spec.key()}{' and its draft' if draft else ''}: {time.perf_counter() - t0:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet-scale", type=float, default=None,
                        help="the speculation target's quiet scale (bench_speculation.py's)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="build the two in two processes at once")
    args = parser.parse_args()
    target = bench_speculation.GPU_SPEC
    if args.quiet_scale is not None:
        target = dataclasses.replace(target, quiet_scale=args.quiet_scale)
    # spawned, not forked: MLX's threads do not survive a fork
    workers = 2 if args.side_by_side else 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(build, bench_hotpath.GPU_SPEC, False),
                pool.submit(build, target, True)]
        for job in jobs:
            print(job.result(), flush=True)


if __name__ == "__main__":
    main()
