"""MLX launch settings on a GPU: mlx-lm's decode speed and a stage's launch and wait under each.

MLX's CUDA backend records kernels into CUDA graphs of up to `MLX_MAX_OPS_PER_BUFFER` nodes (20
by default) and can launch them one by one instead (`MLX_USE_CUDA_GRAPHS=0`). A pipeline stage's
time on a token's path is launching its slice's graph and waiting for the device after that
(bench/RESULTS-gpu.md), so this measures, per setting, in fresh processes:

- mlx-lm alone: one stream's decode tokens/s (`stream_generate`), the ratio to the default;
- a 16-layer slice of the model, one decode step as a stage runs one built ahead: building the
  graph, launching it in four-layer pieces (`mx.async_eval`), waiting for its values;
- the whole model the same way, and a step of 5 positions (a check of 4 speculative
  proposals) done synchronously.

    python bench/bench_knobs.py --gpu      # the 8B-shaped 4-bit llama (bench_hotpath's)
    python bench/bench_knobs.py            # the CPU bench model (the settings do not apply)

The fastest setting for mlx-lm (the default unless another is 3% faster) is written to
`--best` as `NAME=VALUE` lines, for running the pipeline benchmark under it too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_hotpath import GPU_SPEC  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "graphs of 10 ops": {"MLX_MAX_OPS_PER_BUFFER": "10"},
    "graphs of 50 ops": {"MLX_MAX_OPS_PER_BUFFER": "50"},
    "graphs of 120 ops": {"MLX_MAX_OPS_PER_BUFFER": "120"},
    "no CUDA graphs": {"MLX_USE_CUDA_GRAPHS": "0"},
}
EVERY = 4  # layers per piece launched, as worker/stage.py EVAL_EVERY
STEPS = 48


def child(path: str) -> None:
    """In this process's settings: per-step build, launch and wait of a slice and the model."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(path)
    inner = model.model
    half = len(inner.layers) // 2

    def slice_step(token: mx.array, caches: list) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        h = inner.embed_tokens(token)
        marks = []
        for n, (layer, cache) in enumerate(zip(inner.layers[:half], caches, strict=True), 1):
            h = layer(h, None, cache)
            if n % EVERY == 0 and n < half:
                marks.append(h)
        t1 = time.perf_counter()
        for mark in marks:
            mx.async_eval(mark)
        mx.async_eval(h)
        t2 = time.perf_counter()
        mx.eval(h)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def model_step(token: mx.array, caches: list) -> tuple[float, float, float, mx.array]:
        t0 = time.perf_counter()
        y = mx.argmax(model(token, cache=caches)[:, -1, :], axis=-1).reshape(1, 1)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        return t1 - t0, t2 - t1, time.perf_counter() - t2, y

    def verify_step(caches: list) -> float:
        """A step checking 4 proposals (5 positions, as speculative decoding sends), rolled
        back after: its whole time, synchronously."""
        t0 = time.perf_counter()
        mx.eval(mx.argmax(model(mx.array([[11, 12, 13, 14, 15]]), cache=caches), axis=-1))
        seconds = time.perf_counter() - t0
        for cache in caches:
            cache.trim(5)
        return seconds

    prompt = mx.array([[(7 * i + 3) % 1000 + 10 for i in range(64)]])
    out = {}
    caches = make_prompt_cache(model)
    mx.eval(model(prompt, cache=caches))
    times = [verify_step(caches) for _ in range(STEPS // 2)][STEPS // 8:]
    out["verify"] = statistics.median(times) * 1e3
    for name in ("slice", "model"):
        caches = make_prompt_cache(model)
        mx.eval(model(prompt, cache=caches))
        token = mx.array([[11]])
        rows = []
        for _ in range(STEPS):
            if name == "slice":
                rows.append(slice_step(token, caches[:half]))
            else:
                *parts, token = model_step(token, caches)
                rows.append(tuple(parts))
        rows = rows[STEPS // 4:]  # warm-up: kernels built, graphs cached
        out[name] = [statistics.median(r[i] for r in rows) * 1e3 for i in range(3)]
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 8B shape")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=2, help="mlx-lm runs per setting")
    parser.add_argument("--best", type=Path, help="write the fastest setting here")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    bench_serving.PIN = False
    path = cached_model(GPU_SPEC if args.gpu else bench_serving.SPEC)
    rows = {}
    for name, env in SETTINGS.items():
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            tps = statistics.median(bench_serving.bench_mlx_lm(path, 1, 64, 128).tps
                                    for _ in range(args.runs))
            res = subprocess.run([sys.executable, __file__, "--child", str(path)],
                                 capture_output=True, text=True, check=True)
            parts = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        rows[name] = (tps, parts)
        print(f"{name}: {tps:.1f} tok/s {parts}", flush=True)
    base = rows["default"][0]
    print(f"\nmodel {path.name}, prompt 64, 128 new tokens, one stream; ms per decode step "
          f"(medians of {STEPS - STEPS // 4} steps)")
    print("| setting | mlx-lm tok/s | vs default | slice build | slice launch | slice wait "
          "| model build | model launch | model wait | model, 5 positions, synchronous |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (tps, parts) in rows.items():
        cells = [f"{v:.2f}" for v in parts["slice"] + parts["model"] + [parts["verify"]]]
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | " + " | ".join(cells) + " |")
    best = max(rows, key=lambda n: rows[n][0])
    if rows[best][0] < 1.03 * base:  # within the run-to-run spread: keep MLX's default
        best = "default"
    print(f"fastest for mlx-lm (3% or more over the default): {best}")
    if args.best:
        args.best.write_text("".join(f"{k}={v}\n" for k, v in SETTINGS[best].items()))


if __name__ == "__main__":
    main()
