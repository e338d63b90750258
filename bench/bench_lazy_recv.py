"""A stage launched on a lazy receive: MLX's ring backend lets a graph wait for its input.

A pipeline stage today launches its step once the input has arrived (worker/lookahead.py
builds it ahead, but `mx.async_eval` needs values that exist), so each stage's launch lies on
the token's path. `mx.distributed.recv` is lazy: a graph built on it can be launched before the
input exists and runs when it comes (on Metal the GPU waits for the CPU stream's receive in
hardware; on CUDA MLX spins a kernel for it). This measures, between two processes on this
machine joined by MLX's ring backend (TCP), a round trip through a `--layers`-layer stand-in
stage (each layer a 128-wide product, tanh, scale and add):

- `after`: the stage evaluates the receive, then builds and launches its step (today's order);
- `ahead`: the stage builds and launches its next step on the receive before it arrives.

    python bench/bench_lazy_recv.py              # 16 layers, 400 round trips
    python bench/bench_lazy_recv.py --layers 64
    bench/gpu.sh lazy - --layers 32       # on a GPU machine (layers on the GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

WIDTH = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(mode: str, layers: int, trips: int) -> None:
    """One of the two ranks: 0 sends a vector and times its way back, 1 is the stage."""
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    shape = (1, WIDTH)
    if group.rank() == 0:
        times = []
        for i in range(trips):
            x = mx.full(shape, float(i % 7))
            t0 = time.perf_counter()
            mx.eval(mx.distributed.send(x, 1, group=group, stream=mx.cpu))
            mx.eval(mx.distributed.recv(shape, mx.float32, 1, group=group, stream=mx.cpu))
            times.append(time.perf_counter() - t0)
        print(json.dumps(times[trips // 5:]), flush=True)
        return
    mx.random.seed(0)
    weight = mx.random.normal((WIDTH, WIDTH)) * WIDTH ** -0.5
    mx.eval(weight)

    def step() -> mx.array:
        # the ring backend's transfers run on the CPU stream; the layers on the default device
        y = mx.distributed.recv(shape, mx.float32, 0, group=group, stream=mx.cpu)
        if mode == "after":
            mx.eval(y)  # the input first
        for _ in range(layers):
            y = mx.tanh(y @ weight) * 0.5 + y
        out = mx.distributed.send(y, 0, group=group, stream=mx.cpu)
        mx.async_eval(out)  # "ahead": before the input exists
        return out

    pending = step()
    for _ in range(trips - 1):
        following = step() if mode == "ahead" else None
        mx.eval(pending)
        pending = following if following is not None else step()
    mx.eval(pending)


def run(mode: str, layers: int, trips: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        hosts = os.path.join(tmp, "hosts.json")
        with open(hosts, "w") as f:
            json.dump([[f"127.0.0.1:{_free_port()}"], [f"127.0.0.1:{_free_port()}"]], f)
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--rank-mode", mode, "--layers", str(layers),
             "--trips", str(trips)], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "MLX_HOSTFILE": hosts, "MLX_RANK": str(rank)})
            for rank in (1, 0)]
        out, _ = procs[1].communicate(timeout=300)
        procs[0].wait(timeout=60)
        if procs[1].returncode or procs[0].returncode:
            raise SystemExit(f"{mode}: a rank failed")
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--trips", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="of both modes in turn")
    parser.add_argument("--gpu", action="store_true",
                        help="(accepted for bench/gpu.sh: the layers run on the default device)")
    parser.add_argument("--rank-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:
        rank_main(args.rank_mode, args.layers, args.trips)
        return
    import mlx.core as mx

    got: dict[str, list[float]] = {"after": [], "ahead": []}
    for _ in range(args.rounds):
        for mode in got:
            got[mode].append(statistics.median(run(mode, args.layers, args.trips)) * 1e3)
    print(f"MLX {mx.__version__} on {mx.default_device()}, ring backend on loopback, a "
          f"{args.layers}-layer stand-in stage, round trip p50 ms per round")
    print("| stage launches | round trip p50 ms (rounds) |")
    print("|---|---|")
    for mode, label in (("after", "after its input arrives"),
                        ("ahead", "ahead, on the lazy receive")):
        rounds = ", ".join(f"{t:.3f}" for t in got[mode])
        print(f"| {label} | {statistics.median(got[mode]):.3f} ({rounds}) |")


if __name__ == "__main__":
    main()
