"""Per-stage profile of one decode step: where a token's time goes, with 1 worker and with several.

Runs one greedy stream through a local cluster and reads every worker's
`shardline_stage_step_part_seconds{part}` histogram (worker/metrics.py) before and after, so each
stage's mean time per decode step splits into receive (message in hand until the MLX thread
begins it), host (building the graph), device (waiting for the values), serialise (output
messages), send (until written on) and waiting (idle before the step arrived). The last column,
`rest`, is the inter-token latency minus every stage's busy parts: the network, the coordinator
and the time a stage's overlap hides (it can be negative when a stage computes ahead).

    python bench/bench_profile.py                    # CPU, the tiny model, 1 and 3 workers
    python bench/bench_profile.py --workers 1,2,4 --gpu   # the 8B shape on a GPU

A regression shows as the part that grew.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hotpath  # noqa: E402
import bench_serving  # noqa: E402
from bench_serving import bench_shardline  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402
from worker.metrics import STEP_KINDS  # noqa: E402 - the steps a worker times apart

PARTS = ("receive", "host", "device", "serialise", "send", "waiting", "prepare")
BUSY = ("receive", "host", "device", "serialise", "send")
AHEAD = ("taken", "dropped", "early", "sent")  # built ahead (worker/lookahead.py), by outcome


def families(port: int) -> list:
    """A worker's /metrics, parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return list(text_string_to_metric_families(text))


def parts_of(page: list, kind: str = "decode") -> dict[str, tuple[float, float]]:
    """(sum, count) of each part of the steps of `kind` (decode, check) on a parsed page."""
    out: dict[str, list[float]] = {p: [0.0, 0.0] for p in PARTS}
    for family in page:
        if family.name != "shardline_stage_step_part_seconds":
            continue
        for sample in family.samples:
            part = sample.labels.get("part")
            if sample.labels.get("kind") != kind:
                continue
            if part in out and sample.name.endswith("_sum"):
                out[part][0] = sample.value
            elif part in out and sample.name.endswith("_count"):
                out[part][1] = sample.value
    return {p: (v[0], v[1]) for p, v in out.items()}


def stage_times(port: int) -> dict:
    """One scrape of a worker: its step parts by kind (decode, check), and its steps built
    ahead by outcome (`shardline_lookahead_steps_total`: taken, dropped, early, sent)."""
    page = families(port)
    out: dict = {kind: parts_of(page, kind) for kind in STEP_KINDS}
    out["ahead"] = {s.labels["outcome"]: s.value for f in page
                    if f.name == "shardline_lookahead_steps" for s in f.samples
                    if s.name.endswith("_total")}
    return out


def spy(pids: list[int], seconds: float, label: str) -> list[tuple[subprocess.Popen, Path]]:
    """A py-spy sampler (native frames, idle ones too) on each of `pids` for `seconds`, each
    writing collapsed stacks by thread to $OUT (or /tmp)."""
    exe = shutil.which("py-spy")
    out = Path(os.environ.get("OUT", "/tmp"))
    spies = []
    for i, pid in enumerate(pids):
        path = out / f"pyspy-{label}-stage{i}.txt"
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
               "--rate", "250", "--native", "--idle", "--threads",
               "--format", "raw", "--output", str(path)]
        spies.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True), path))
    return spies


def spied(path: Path, top: int = 10) -> str:
    """The busiest threads of a py-spy capture and, per thread, what its samples were in: the
    innermost Python function (file:line) and the innermost frame, native or not."""
    threads: dict[str, list[collections.Counter]] = collections.defaultdict(
        lambda: [collections.Counter(), collections.Counter()])
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        python = [f for f in frames if ".py:" in f]
        leaf = frames[-1] if frames else "?"
        if leaf.startswith("0x"):  # an unnamed native frame: its library
            leaf = leaf.partition(" ")[2] or leaf
        by = threads[thread]
        by[0][python[-1] if python else "(no Python frame)"] += int(count)
        by[1][leaf] += int(count)
    lines = []
    for thread, (inner, leaves) in sorted(threads.items(),
                                          key=lambda t: -sum(t[1][0].values()))[:4]:
        total = sum(inner.values())
        lines.append(f"  {thread}: {total} samples; innermost Python function, then frame")
        for counter in (inner, leaves):
            for frame, n in counter.most_common(top):
                lines.append(f"    {100 * n / total:5.1f}% {frame[:110]}")
            lines.append("    --")
    return "\n".join(lines)


async def profile(path: Path, workers: int, new: int, pin: bool,
                  spy_seconds: float = 0.0) -> tuple[float, list[dict]]:
    """ITL p50 (ms) of one stream and, per stage, the mean ms of each part per decode step;
    with `spy_seconds`, py-spy samples every worker for that long from the decode's start."""
    local, coord = await bench_hotpath.start_cluster(path, workers, 4, pin)
    try:
        await bench_shardline(coord, "warm-up", 1, 32, 16)
        ports = [w.info.metrics_port for w in coord.cluster.workers[:workers]]
        before = [stage_times(p) for p in ports]
        spies = spy([p.pid for p in local.procs], spy_seconds, str(workers)) \
            if spy_seconds else []
        result = await bench_shardline(coord, "profile", 1, 32, new, warm=False)
        after = [stage_times(p) for p in ports]
        for proc, capture in spies:
            _, err = proc.communicate(timeout=spy_seconds + 60)
            print(f"py-spy, {capture.name}:\n{spied(capture)}" if capture.exists() else
                  f"py-spy failed: {err.strip()[-300:]}", flush=True)
    finally:
        await coord.stop()
        local.stop()
    stages = []
    for b, a in zip(before, after, strict=True):
        stage = {}
        for part in PARTS:
            total, count = (a["decode"][part][i] - b["decode"][part][i] for i in (0, 1))
            stage[part] = total / count * 1e3 if count else 0.0
        for outcome in AHEAD:
            stage[outcome] = a["ahead"].get(outcome, 0.0) - b["ahead"].get(outcome, 0.0)
        stages.append(stage)
    return statistics.median(result.itl) * 1e3, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,3", help="comma-separated worker counts")
    parser.add_argument("--gpu", action="store_true", help="the 8B shape, nothing pinned")
    parser.add_argument("--model", choices=("tiny", "bench"), default="tiny",
                        help="CPU model: the hop benchmark's tiny one or the 8-layer bench one")
    parser.add_argument("--spread", action="store_true",
                        help="CPU: the workers spread over the cores as --local-workers places "
                             "them (default: all on core 0)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                        help="also sample every worker with py-spy (native frames) for that "
                             "long from the timed decode's start; collapsed stacks to $OUT")
    args = parser.parse_args()
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy needs py-spy on the PATH (pip install py-spy)")
    pin = not args.gpu and not args.spread
    bench_serving.PIN = pin
    spec = bench_hotpath.GPU_SPEC if args.gpu else (
        bench_hotpath.HOP_SPEC if args.model == "tiny" else bench_hotpath.CPU_SPEC)
    path = cached_model(spec)
    print(f"model {spec.key()}, 1 stream, {args.new} new tokens, mean ms per decode step")
    print("| workers | stage | " + " | ".join(PARTS) + " | busy | ITL p50 | rest | built ahead: "
          + ", ".join(AHEAD) + " |")
    print("|---|---|" + "---|" * (len(PARTS) + 4))
    for n in (int(w) for w in args.workers.split(",")):
        itl, stages = asyncio.run(profile(path, n, args.new, pin, args.py_spy))
        busy_all = 0.0
        for i, stage in enumerate(stages):
            busy = sum(stage[p] for p in BUSY)
            busy_all += busy
            cells = " | ".join(f"{stage[p]:.3f}" for p in PARTS)
            last = i == len(stages) - 1
            tail = f"{itl:.3f} | {itl - busy_all:.3f}" if last else " | "
            ahead = ", ".join(str(int(stage[o])) for o in AHEAD)
            print(f"| {n} | {i} | {cells} | {busy:.3f} | {tail} | {ahead} |")


if __name__ == "__main__":
    main()
