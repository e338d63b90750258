"""Hot-path benchmark: mlx-lm alone vs Shardline through 1..N workers, same run, ratios printed.

Decode speed (one stream: mlx-lm `stream_generate`; several: `batch_generate`) against Shardline
with 1, 2, ... workers on this one machine, and the time one more hop adds to a token.

    python bench/bench_hotpath.py                # CPU: the 8-layer bench model, 1 and 3 workers
    python bench/bench_hotpath.py --hops         # CPU: a tiny model through 1..4 workers,
                                                 # the added ms per token per added hop
                                                 # (spread over the cores; --pin: all on core 0)
    python bench/bench_hotpath.py --gpu          # GPU: the 8B-shaped 4-bit llama, 1/2/4
                                                 # workers, 1 and 8 streams
    python bench/bench_hotpath.py --gpu --also SHARDLINE_FUSE=0   # and clusters whose
                                                 # workers have that setting, in turn
                                                 # (--also repeats: a cluster each)

On the CPU, mlx-lm and every worker are pinned to core 0 (the compute gets one core in every
row; the coordinator and the client run beside it on the other core). On a GPU nothing is
pinned and every worker shares the one GPU, so the rows measure overhead, not added compute;
on a machine with several, the workers take one each in turn, as local workers do
(coordinator/local.py; `--also SHARDLINE_SPREAD=0`: all on the first), mlx-lm the first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_serving import GiB, Result, bench_mlx_lm, bench_shardline  # noqa: E402

from coordinator.demo import ModelSpec, cached_model  # noqa: E402

CPU_SPEC = bench_serving.SPEC
GPU_SPEC = ModelSpec(family="llama", num_layers=32, hidden_size=4096, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, bits=4,
                     max_position_embeddings=4096)
HOP_SPEC = ModelSpec(family="llama", num_layers=4, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     max_position_embeddings=4096)


SHARDS: Path | None = None  # --reuse-shards: the workers' one cache, kept between clusters


async def start_cluster(path: Path, workers: int, streams: int, pin: bool,
                        env: dict[str, str] | None = None):
    """`workers` local workers (with `env` added to their environment) and a coordinator
    serving `path`, started."""
    from coordinator.app import Coordinator, ServeOptions
    from coordinator.local import LocalWorkers

    local = LocalWorkers(workers, memory=[(4 if pin else 32) * GiB] * workers,
                         cpus=[0] * workers if pin else None, cache_dir=SHARDS,
                         fresh_cache=SHARDS is None)
    local.env.update(env or {})
    addresses = local.start(timeout=300)
    coord = Coordinator(ServeOptions(model=str(path), workers=addresses, host="127.0.0.1",
                                     grpc_port=0, http_port=0, max_sequences=streams, context=4096,
                                     prefix_cache_tokens=0),
                        progress=lambda m: None)
    try:
        await coord.start()
    except BaseException:
        local.stop()
        raise
    return local, coord


def workers_of(workers: int, setting: str = "") -> str:
    return f"{workers} worker{'s' if workers > 1 else ''}" + (f" ({setting})" if setting else "")


def label_of(workers: int, setting: str = "") -> str:
    return f"shardline {workers_of(workers, setting)}"


async def interleaved_runs(path: Path, counts: list[int], streams: list[int], prompt: int,
                           new: int, runs: int, pin: bool, baseline=None,
                           also: tuple[str, ...] = (), apart: bool = False
                           ) -> tuple[dict[int, list[Result]], dict[tuple[int, str],
                                                                    dict[int, list[Result]]]]:
    """A cluster of each size in `counts` (and, for each "VAR=VALUE" of `also`, another of
    each size whose workers have that setting), then `runs` rounds of one run of each
    (`baseline(s)` first, where given, then every cluster), per stream count s, so that a slow
    spell of the machine falls on every row alike. The clusters are all started at once and
    warmed up before the first round, or, `apart`, each started and warmed up (a whole run)
    for its own runs in every round and stopped after them, so that none runs beside the
    others' idle workers (on a GPU those slowed mlx-lm and the running cluster:
    bench/RESULTS-gpu.md).
    Returns the baseline's runs and each cluster's, by (size, setting) and stream count."""
    keys = [(w, setting) for setting in ("", *also) for w in counts]
    clusters = {}

    async def up(key: tuple[int, str]) -> None:
        w, setting = key
        env = dict([setting.split("=", 1)]) if setting else None
        clusters[key] = await start_cluster(path, w, max(streams), pin, env)
        for s in streams:  # apart: a whole run first (a fresh cluster is slow at first)
            await bench_shardline(clusters[key][1], label_of(*key), s, prompt,
                                  new if apart else min(new, 16))

    async def down(key: tuple[int, str]) -> None:
        local, coord = clusters.pop(key)
        try:
            await coord.stop()
        finally:
            local.stop()

    try:
        if not apart:
            for key in keys:
                await up(key)
        base: dict[int, list[Result]] = {s: [] for s in streams}
        out = {key: {s: [] for s in streams} for key in keys}
        for _ in range(runs):
            for s in streams:
                if baseline is not None:  # in a thread: the coordinators' loop keeps running
                    base[s].append(await asyncio.to_thread(baseline, s))
                    print(f"mlx-lm, {s} streams: {spread(base[s][-1])}", flush=True)
            for key in keys:
                if apart:
                    await up(key)
                for s in streams:
                    out[key][s].append(await bench_shardline(clusters[key][1], label_of(*key),
                                                             s, prompt, new, warm=False))
                    # kept if the run is cut short by its time limit
                    print(f"{label_of(*key)}, {s} streams: {spread(out[key][s][-1])}",
                          flush=True)
                if apart:
                    await down(key)
        return base, out
    finally:
        for key in list(clusters):
            await down(key)


def spread(r: Result) -> str:
    """A run's tokens/s and, where it streamed, its first token's time, its tokens/s after
    that, and its inter-token latencies: the median and the 90th percentile against the mean
    say whether a slow run was slow throughout or stalled."""
    if not r.itl:
        return f"{r.tps:.1f} tok/s"
    return (f"{r.tps:.1f} tok/s, TTFT {r.ttft[0] * 1e3:.1f} ms, after it {decode_tps(r):.1f} "
            f"tok/s, ITL p50 {r.pct(r.itl, 0.5) * 1e3:.2f} ms, p90 "
            f"{r.pct(r.itl, 0.9) * 1e3:.2f}, max {max(r.itl) * 1e3:.1f}, mean "
            f"{statistics.fmean(r.itl) * 1e3:.2f}")


def decode_tps(r: Result) -> float:
    """One stream's tokens/s after its first token (mlx-lm's "generation" rate): the time to
    the first token, which the prompt's prefill takes, left out."""
    return len(r.itl) / sum(r.itl) if r.itl else 0.0


def median_tps(results: list[Result]) -> float:
    return statistics.median(r.tps for r in results)


def gpus_used() -> str:
    """The GPUs the workers take (coordinator/local.py), said for the results' title."""
    from coordinator.local import local_gpus

    gpus = local_gpus(2, os.environ)
    return f"{len(gpus)} GPUs, the workers one each in turn" if gpus else "GPU"


def median_itl_ms(results: list[Result]) -> float:
    return statistics.median(r.pct(r.itl, 0.5) for r in results) * 1e3


def decode(args: argparse.Namespace) -> None:
    spec = GPU_SPEC if args.gpu else CPU_SPEC
    workers = [int(w) for w in args.workers.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    pin = not args.gpu and hasattr(os, "sched_setaffinity")
    bench_serving.PIN = pin
    t0 = time.perf_counter()  # a first build of the 8B shape takes minutes: say so
    path = cached_model(spec)
    print(f"model {spec.key()} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    base, rows = asyncio.run(interleaved_runs(
        path, workers, streams, args.prompt, args.new, args.runs, pin,
        baseline=lambda s: bench_mlx_lm(path, s, args.prompt, args.new),
        also=tuple(args.also), apart=args.apart))
    print(f"model {spec.key()}, prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"medians of {args.runs} runs, mlx-lm and every cluster in turn "
          f"({'each cluster up only for its runs' if args.apart else 'all clusters up'}), "
          f"{gpus_used() if args.gpu else 'CPU pinned to core 0'}")
    # one stream: also its tokens/s after the first token, and its median gap between tokens
    # (the steady pace, no stalls)
    itl = 1 in streams
    print("| system | " + " | ".join(f"{s} stream{'s' if s > 1 else ''} tok/s" for s in streams)
          + (" | 1 stream, after the first token, tok/s | 1 stream ITL p50 ms |" if itl
             else " |"))
    print("|---|" + "---|" * (len(streams) + 2 * itl))

    def after_first(results: list[Result]) -> float:
        return statistics.median(decode_tps(r) for r in results)

    print("| mlx-lm | " + " | ".join(f"{median_tps(base[s]):.1f}" for s in streams)
          + (f" | {after_first(base[1]):.1f} | {median_itl_ms(base[1]):.2f} |" if itl
             else " |"))
    for key, by in rows.items():
        cells = [f"{median_tps(by[s]):.1f} ({median_tps(by[s]) / median_tps(base[s]):.2f}x)"
                 for s in streams]
        if itl:
            cells.append(f"{after_first(by[1]):.1f} "
                         f"({after_first(by[1]) / after_first(base[1]):.2f}x)")
            cells.append(f"{median_itl_ms(by[1]):.2f} "
                         f"({median_itl_ms(base[1]) / median_itl_ms(by[1]):.2f}x)")
        print(f"| shardline, {workers_of(*key)} | " + " | ".join(cells) + " |")
    if 1 in streams:  # greedy: every run's tokens are mlx-lm's, or the speed means nothing
        want = base[1][0].ids
        same = {key: all(r.ids == want for r in by[1]) for key, by in rows.items()}
        print("token-exact against mlx-lm at one stream: " + ", ".join(
            f"{workers_of(*key)} {'yes' if ok else 'NO'}" for key, ok in same.items()))


def hops(args: argparse.Namespace) -> None:
    pin = args.pin and hasattr(os, "sched_setaffinity")
    bench_serving.PIN = pin
    path = cached_model(HOP_SPEC)
    counts = [int(w) for w in args.workers.split(",")] if args.workers_set else [1, 2, 3, 4]
    _, by = asyncio.run(interleaved_runs(path, counts, [1], 32, args.new, args.runs, pin,
                                         also=tuple(args.also), apart=args.apart))
    where = "workers pinned to core 0" if pin else "workers placed as --local-workers places them"
    print(f"model {HOP_SPEC.key()}, 1 stream, {args.new} new tokens, ITL p50 medians of "
          f"{args.runs} runs interleaved across the cluster sizes, {where}")
    for setting in ("", *args.also):
        itl = {w: median_itl_ms(by[w, setting][1]) for w in counts}
        tag = f" ({setting})" if setting else ""
        print(f"| workers{tag} | ITL p50 ms | added vs one fewer |")
        print("|---|---|---|")
        prev = None
        for w in counts:
            added = "" if prev is None else f"{itl[w] - itl[prev]:+.3f}"
            print(f"| {w} | {itl[w]:.3f} | {added} |")
            prev = w
        if len(counts) < 2:
            continue
        # the least-squares slope over every count: one noisy row moves it by a fraction of
        # its error, where the median of the steps between neighbours could swing by all of it
        mean_w, mean_t = statistics.mean(counts), statistics.mean(itl.values())
        slope = sum((w - mean_w) * (itl[w] - mean_t) for w in counts) / sum(
            (w - mean_w) ** 2 for w in counts)
        print(f"added ms per token per added hop{tag}: "
              f"{slope:.3f}, the least-squares slope over {min(counts)} to {max(counts)} "
              f"workers (target <= 0.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 8B shape, 1/2/4 workers")
    parser.add_argument("--hops", action="store_true", help="added time per hop, tiny model")
    parser.add_argument("--workers", help="comma-separated worker counts")
    parser.add_argument("--streams", help="comma-separated stream counts")
    parser.add_argument("--pin", action="store_true",
                        help="--hops: pin every worker to core 0 (default: spread over the "
                             "cores as --local-workers spreads them)")
    parser.add_argument("--also", action="append", default=[], metavar="VAR=VALUE",
                        help="also a cluster of each size whose workers have this setting, "
                             "in turn with the others (e.g. SHARDLINE_FUSE=0); repeatable")
    parser.add_argument("--apart", action=argparse.BooleanOptionalAction, default=None,
                        help="start each cluster for its own runs only, every round (default "
                             "with --gpu: idle workers beside a run slowed it there); "
                             "--no-apart: all up at once")
    parser.add_argument("--reuse-shards", action="store_true",
                        help="the workers keep their shards in one cache between clusters "
                             "(as machines do after a first start) instead of each cluster's "
                             "being shipped to empty caches: faster starts, same decode")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    if args.reuse_shards:
        global SHARDS
        SHARDS = Path(os.environ.get("SHARDLINE_CACHE_DIR") or Path.home() / ".cache/shardline"
                      ) / "bench-workers"
    args.workers_set = bool(args.workers)
    args.workers = args.workers or ("1,2,4" if args.gpu else "1,3")
    args.streams = args.streams or ("1,8" if args.gpu else "1")
    args.apart = args.gpu if args.apart is None else args.apart
    hops(args) if args.hops else decode(args)


if __name__ == "__main__":
    main()
