"""One middle stage's decode step, in one process: the parts of it on the token's path.

A stage of `--layers` layers of the hop model (bench_hotpath.HOP_SPEC) is fed by a first stage
in the same process, its next step prepared ahead as a worker does (worker/lookahead.py); each
step's parts are timed: writing the message into the prepared graph, launching it, waiting for
the values, building the output. It also counts the primitives of one layer's decode graph on
this backend. No network, no threads but MLX's own: what a stage costs at the least.

    python bench/bench_stage.py                 # 1 and 2 layers
    python bench/bench_stage.py --layers 1,3 --steps 500
    python bench/bench_stage.py --bits 4        # the hop model quantized (4-bit)

SHARDLINE_FUSE=0 measures without worker/fused.py's joined products.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hotpath import HOP_SPEC  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402

PARTS = ("fill", "launch", "wait", "output")


def parts(path: Path, layers: int, steps: int) -> dict[str, float]:
    """Median ms of each part of a prepared middle-stage step of `layers` layers."""
    from protos import inference_pb2, worker_pb2
    from worker.shard import load_shard
    from worker.stage import StageRunner

    first = StageRunner(load_shard(path, 0, 1))
    stage = StageRunner(load_shard(path, 1, 1 + layers))
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    clock = time.perf_counter

    def timed(obj: object, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t0 = clock()
            out = fn(*args, **kwargs)
            times[part].append(clock() - t0)
            return out

        setattr(obj, name, wrapper)

    timed(stage.lookahead, "_fill", "fill")
    timed(stage, "launch", "launch")
    timed(stage, "_output", "output")
    prompt = list(range(1, 20))
    start = worker_pb2.SeqInput(seq_id="s", token_ids=prompt, start=True, sample=True,
                                sampling=inference_pb2.SamplingParams())
    stage.run(first.run(worker_pb2.StageMessage(step_id=1, seqs=[start])).forward)
    offset = len(prompt)
    for i in range(steps):
        seq = worker_pb2.SeqInput(seq_id="s", token_ids=[5], offset=offset, sample=True)
        fwd = first.run(worker_pb2.StageMessage(step_id=2 + i, seqs=[seq])).forward
        fwd = worker_pb2.StageMessage.FromString(fwd.SerializeToString())
        pending = stage.begin(fwd)
        out = stage.finish(pending)
        times["wait"].append(out.device_seconds)
        stage.prepare(pending)
        offset += 1
    if stage.lookahead is None or stage.lookahead.taken < steps - 1:
        raise SystemExit("the stage did not take its prepared steps: nothing to measure")
    skip = steps // 5  # warm-up
    return {p: statistics.median(v[skip:]) * 1e3 for p, v in times.items() if v}


def primitives(path: Path) -> collections.Counter:
    """The primitives of one layer's decode step (one position after 19) on this backend."""
    import mlx.core as mx

    from worker import fused
    from worker.shard import load_shard

    shard = load_shard(path, 1, 2)
    fused.fuse(shard.model)  # as a stage has it (worker/stage.py)
    cache = shard.new_caches()[0]
    layer = shard.layers[0]
    hidden = shard.model.args.hidden_size
    mx.eval(layer(mx.zeros((1, 19, hidden), dtype=mx.bfloat16), "causal", cache))
    out = layer(mx.zeros((1, 1, hidden), dtype=mx.bfloat16), None, cache)
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    return collections.Counter(re.findall(r'label ="([A-Za-z_]+)", shape=rectangle',
                                          dot.getvalue()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2", help="comma-separated layer counts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bits", type=int, default=0, help="quantize the hop model (4, 8)")
    args = parser.parse_args()
    spec = dataclasses.replace(HOP_SPEC, bits=args.bits) if args.bits else HOP_SPEC
    path = cached_model(spec)
    import mlx.core as mx

    ops = primitives(path)
    common = ", ".join(f"{n} {kind}" for kind, n in ops.most_common(6))
    print(f"model {spec.key()}, MLX {mx.__version__} on {mx.default_device()}: one layer's "
          f"decode step is {sum(ops.values())} primitives ({common}, ...)")
    print("| layers | " + " | ".join(PARTS) + " | on the path |")
    print("|---|" + "---|" * (len(PARTS) + 1))
    for layers in (int(n) for n in args.layers.split(",")):
        got = parts(path, layers, args.steps)
        print(f"| {layers} | " + " | ".join(f"{got[p]:.3f}" for p in PARTS) +
              f" | {sum(got.values()):.3f} |")


if __name__ == "__main__":
    main()
