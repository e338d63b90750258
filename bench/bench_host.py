"""One worker's decode step against mlx-lm's, in one process: where the extra host time goes.

A worker that holds the whole model decodes as mlx-lm's `generate_step` does (it builds step
t+1 on step t's lazy token), yet on a GPU with a slow host it is slower (bench/RESULTS-gpu.md).
This separates the parts, with no network, coordinator or threads, in one process per row:

- `mlx-lm`: mlx-lm's loop (`generate_step`'s order: build, `async_eval`, read the token
  before) on mlx-lm's model;
- `mlx-lm loop, shard model`: the same loop on the model as a worker changes it
  (worker/padding.py, worker/fused.py), which the row above tells apart from;
- `stage runner`: worker/stage.py's StageRunner deciding every step (`begin`, `finish`,
  `prepare`, its decode-ahead), fed each token as a worker would be.

For each: tokens/s, and the median ms per step of building the graph (Python), launching it
(`mx.async_eval`) and waiting for a token (`.item()`); every row's tokens must be mlx-lm's.

    python bench/bench_host.py --gpu       # the 8B-shaped 4-bit llama (bench_hotpath's)
    python bench/bench_host.py             # the CPU bench model
    python bench/bench_host.py --gpu --also SHARDLINE_EVAL_EVERY=64   # and the runner so
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

PROMPT = [(11 * j) % 2000 + 10 for j in range(64)]
ROWS = ("mlx-lm", "mlx-lm loop, shard model", "stage runner")


def _loop(model, caches, new: int) -> dict:
    """`generate_step`'s decode order, greedy, timing its parts."""
    import mlx.core as mx

    clock = time.perf_counter
    parts: dict[str, list[float]] = {"build": [], "launch": [], "wait": []}

    def step(tokens: mx.array) -> mx.array:
        logits = model(tokens[None], cache=caches)[:, -1, :]
        return mx.argmax(logits, axis=-1)

    y = step(mx.array(PROMPT, dtype=mx.int32))
    mx.async_eval(y)
    out, t0 = [], clock()
    for _ in range(new):
        a = clock()
        nxt = step(y)
        b = clock()
        mx.async_eval(nxt)
        c = clock()
        out.append(y.item())
        d = clock()
        parts["build"].append(b - a)
        parts["launch"].append(c - b)
        parts["wait"].append(d - c)
        y = nxt
    return {"tokens": out, "seconds": clock() - t0, "parts": parts}


def _whole(path: str):
    """The model as one worker holding all of it loads it."""
    from worker.shard import load_shard

    layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    return load_shard(path, 0, layers)


def _runner(path: str, new: int) -> dict:
    """A whole-model StageRunner fed one token a step, as a worker's MLX thread runs it."""
    import mlx.core as mx

    from protos import inference_pb2, worker_pb2
    from worker.stage import StageRunner

    shard = _whole(path)
    runner = StageRunner(shard)
    clock = time.perf_counter
    parts: dict[str, list[float]] = {"begin": [], "finish": [], "prepare": []}
    start = worker_pb2.SeqInput(seq_id="s", token_ids=PROMPT, start=True, sample=True,
                                sampling=inference_pb2.SamplingParams(temperature=0.0))
    out = runner.run(worker_pb2.StageMessage(step_id=0, seqs=[start]))
    token, offset = out.outputs[0].token, len(PROMPT)
    tokens, t0 = [], clock()
    for i in range(new):
        tokens.append(token)
        seq = worker_pb2.SeqInput(seq_id="s", token_ids=[token], offset=offset, sample=True)
        a = clock()
        pending = runner.begin(worker_pb2.StageMessage(step_id=1 + i, seqs=[seq]))
        b = clock()
        out = runner.finish(pending)
        c = clock()
        runner.prepare(pending)
        d = clock()
        parts["begin"].append(b - a)
        parts["finish"].append(c - b)
        parts["prepare"].append(d - c)
        token, offset = out.outputs[0].token, offset + 1
    mx.eval([])
    return {"tokens": tokens, "seconds": clock() - t0, "parts": parts}


def child(path: str, row: str, new: int) -> None:
    """One row, in this process; prints its result as JSON."""
    if row == "stage runner":
        _runner(path, 4)  # warm-up: kernels built on first use
        res = _runner(path, new)
    else:
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = load(path)
        if row != "mlx-lm":
            from worker.stage import StageRunner

            shard = _whole(path)
            StageRunner(shard)  # pads and fuses the shard's model as a worker does
            model = shard.model
        _loop(model, make_prompt_cache(model), 4)
        res = _loop(model, make_prompt_cache(model), new)
    print(json.dumps(res))


def _median_ms(results: list[dict], part: str, skip: int) -> float:
    """A part's median ms per step over every run, each run's first `skip` steps left out."""
    return statistics.median(v for r in results for v in r["parts"][part][skip:]) * 1e3


def run_row(path: Path, row: str, new: int, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--row", row,
                           "--new", str(new)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    if proc.returncode:
        raise SystemExit(f"{row}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 8B shape (bench_hotpath's)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2, help="rounds of every row in turn")
    parser.add_argument("--also", action="append", default=[], metavar="VAR=VALUE",
                        help="also the shard rows with this setting (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.row, args.new)
        return
    path = cached_model(GPU_SPEC if args.gpu else bench_serving.SPEC)
    rows = [(row, "") for row in ROWS] + [(row, s) for s in args.also for row in ROWS[1:]]
    got: dict[tuple[str, str], list[dict]] = {key: [] for key in rows}
    for _ in range(args.runs):
        for row, setting in rows:
            env = dict([setting.split("=", 1)]) if setting else {}
            got[row, setting].append(run_row(path, row, args.new, env))
            res = got[row, setting][-1]
            print(f"{row} {setting}: {args.new / res['seconds']:.1f} tok/s", flush=True)
    want = got["mlx-lm", ""][0]["tokens"]
    base = statistics.median(args.new / r["seconds"] for r in got["mlx-lm", ""])
    print(f"model {path.name}, prompt {len(PROMPT)}, {args.new} new tokens, greedy, medians "
          f"of {args.runs} runs; ms per step")
    print("| row | tok/s | ratio | parts (median ms per step) | exact |")
    print("|---|---|---|---|---|")
    for (row, setting), results in got.items():
        tps = statistics.median(args.new / r["seconds"] for r in results)
        skip = args.new // 8
        parts = ", ".join(f"{name} {_median_ms(results, name, skip):.3f}"
                          for name in results[0]["parts"])
        exact = all(r["tokens"] == want for r in results)
        print(f"| {row}{' ' + setting if setting else ''} | {tps:.1f} | {tps / base:.2f}x | "
              f"{parts} | {'yes' if exact else 'NO'} |")


if __name__ == "__main__":
    main()
