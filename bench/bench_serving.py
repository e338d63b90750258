"""Serving benchmark: mlx-lm alone vs Shardline on 1 worker and on 2 pinned workers.

Same model, same machine, same run. Prints tokens/s, time to first token and inter-token latency
(p50/p99) at 1, 4, 8 and 16 concurrent streams, the ratios the issue asks for, and the time to
first token of a 2048-token prompt with and without chunked prefill; writes bench/RESULTS.md and
bench/serving.png.

    python bench/bench_serving.py            # about 5 minutes on 2 CPU cores
    python bench/bench_serving.py --quick    # a smoke run
    python bench/bench_serving.py --gpu      # CUDA/Metal: a 0.9B-parameter model, no pinning,
                                             # writes bench/RESULTS-gpu.md and serving-gpu.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.demo import ModelSpec, cached_model  # noqa: E402

SPEC = ModelSpec(family="llama", num_layers=8, hidden_size=512, intermediate_size=1536,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                 max_position_embeddings=4096)
GPU_SPEC = ModelSpec(family="llama", num_layers=16, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=8192,
                     max_position_embeddings=4096)
GiB = 1 << 30
PIN = True  # CPU runs pin mlx-lm to core 0 and worker i to core i; --gpu turns it off
SECRET: bytes | None = None  # a cluster secret for the workers (bench_overhead --secret)


@dataclass
class Result:
    label: str
    streams: int
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)  # each stream's tokens (where kept)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(37 * i + 11 * j) % 2000 + 10 for j in range(length)] for i in range(n)]


def bench_mlx_lm(path: Path, streams: int, prompt_len: int, new: int) -> Result:
    """(a) mlx-lm alone, in a process pinned to core 0 from its start (all its threads too)."""
    cmd = [sys.executable, __file__, "--mlx-lm", str(path), str(streams), str(prompt_len),
           str(new)]
    pin_child = (lambda: os.sched_setaffinity(0, {0})) \
        if PIN and hasattr(os, "sched_setaffinity") else None
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pin_child)
    if out.returncode != 0:  # say why: its traceback is the only record of what went wrong
        raise RuntimeError(f"mlx-lm's run exited with {out.returncode}:\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Result("mlx-lm", streams, data["tokens"], data["wall"], data["ttft"], data["itl"],
                  data.get("ids", []))


def run_mlx_lm(path: str, streams: int, prompt_len: int, new: int) -> None:
    """Child side of bench_mlx_lm: stream_generate for 1 stream, batch_generate for more."""
    from mlx_lm import batch_generate, load, stream_generate

    model, tokenizer = load(path)
    res = Result("mlx-lm", streams)
    # warm up with the timed shapes (GPU backends compile kernels per shape on first use)
    if streams == 1:
        for _ in stream_generate(model, tokenizer, prompts(1, prompt_len)[0], max_tokens=4):
            pass
    else:
        batch_generate(model, tokenizer, prompts(streams, prompt_len), max_tokens=4)
    t0 = time.perf_counter()
    if streams == 1:
        last, res.ids = None, [[]]
        for r in stream_generate(model, tokenizer, prompts(1, prompt_len)[0], max_tokens=new):
            res.ids[0].append(r.token)
            now = time.perf_counter()
            if last is None:
                res.ttft.append(now - t0)
            else:
                res.itl.append(now - last)
            last = now
            res.tokens += 1
    else:
        batch_generate(model, tokenizer, prompts(streams, prompt_len), max_tokens=new)
        res.tokens = streams * new  # test models never emit EOS: every prompt runs to the end
    res.wall = time.perf_counter() - t0
    print(json.dumps({"tokens": res.tokens, "wall": res.wall, "ttft": res.ttft, "itl": res.itl,
                      "ids": res.ids}))


async def bench_shardline(coordinator, label: str, streams: int, prompt_len: int,
                          new: int, warm: bool = True) -> Result:
    import grpc

    from protos import inference_pb2, inference_pb2_grpc

    res = Result(label, streams)
    address = f"127.0.0.1:{coordinator.grpc_port}"
    tls = getattr(coordinator.options, "tls", None)  # the API over TLS: trust the cluster CA
    channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls.ca)) if tls \
        else grpc.aio.insecure_channel(address)
    async with channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(ids: list[int], max_tokens: int = new) -> list[int]:
            out: list[int] = []
            req = inference_pb2.GenerateRequest(
                prompt_token_ids=ids, sampling=inference_pb2.SamplingParams(max_tokens=max_tokens))
            t0 = time.perf_counter()
            last = None
            async for msg in stub.Generate(req):
                now = time.perf_counter()
                if msg.token_ids:
                    if last is None:
                        res.ttft.append(now - t0)
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.tokens += len(msg.token_ids)
                    out += msg.token_ids
            return out

        # warm up with the timed shapes, as for mlx-lm
        if warm:
            await asyncio.gather(*(one(p, 4) for p in prompts(streams, prompt_len)))
        res.tokens, res.ttft, res.itl = 0, [], []
        t0 = time.perf_counter()
        res.ids = await asyncio.gather(*(one(p) for p in prompts(streams, prompt_len)))
        res.wall = time.perf_counter() - t0
    return res


async def with_cluster(path: Path, workers: int, fn, *, prefill_chunk: int = 512):
    from coordinator.app import Coordinator, ServeOptions
    from coordinator.local import LocalWorkers

    local = LocalWorkers(workers, memory=[(32 if not PIN else 4) * GiB] * workers,
                         cpus=list(range(workers)) if PIN else None,
                         fresh_cache=True, secret=SECRET)
    addresses = local.start()
    coord = Coordinator(ServeOptions(model=str(path), workers=addresses, host="127.0.0.1",
                                     grpc_port=0, max_sequences=16, context=4096,
                                     prefill_chunk=prefill_chunk, prefix_cache_tokens=0,
                                     secret=SECRET),
                        progress=lambda m: None)
    try:
        await coord.start()
        return await fn(coord)
    finally:
        await coord.stop()
        local.stop()


async def long_prompt_ttft(coordinator, length: int, repeats: int) -> float:
    res = Result("ttft", 1)
    for i in range(repeats):
        res.ttft += (await bench_shardline(coordinator, "ttft", 1, length, 1, warm=i == 0)).ttft
    return statistics.median(res.ttft)


def row(r: Result) -> str:
    ms = 1e3
    return (f"| {r.label} | {r.streams} | {r.tps:.1f} | {r.pct(r.ttft, 0.5) * ms:.0f} | "
            f"{r.pct(r.itl, 0.5) * ms:.1f} | {r.pct(r.itl, 0.99) * ms:.1f} |")


def plot(results: list[Result], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {out.name}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r.label for r in results):
        rs = [r for r in results if r.label == label]
        ax.plot([r.streams for r in rs], [r.tps for r in rs], marker="o", label=label)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


async def main_async(args: argparse.Namespace) -> str:
    spec = GPU_SPEC if args.gpu else SPEC
    path = cached_model(spec)
    streams = [1, 4] if args.quick else [1, 4, 8, 16]
    if args.streams:
        streams = [int(n) for n in args.streams.split(",")]
    new = 16 if args.quick else 64
    plen = 64 if args.quick else 128
    results = [bench_mlx_lm(path, s, plen, new) for s in streams]

    async def sweep(label):
        async def fn(coord):
            return [await bench_shardline(coord, label, s, plen, new) for s in streams]
        return fn

    results += await with_cluster(path, 1, await sweep("shardline 1 worker"))
    results += await with_cluster(path, 2, await sweep("shardline 2 workers"))
    long = 512 if args.quick else 2048
    reps = 1 if args.quick else 3

    async def ttft(coord):
        return await long_prompt_ttft(coord, long, reps)

    chunked = whole = float("nan")
    if not args.no_ttft:
        chunked = await with_cluster(path, 2, ttft, prefill_chunk=256)
        whole = await with_cluster(path, 2, ttft, prefill_chunk=long)

    by = {(r.label, r.streams): r for r in results}
    a1, b1 = by[("mlx-lm", 1)], by[("shardline 1 worker", 1)]
    c1 = by[("shardline 2 workers", 1)]
    c8 = by.get(("shardline 2 workers", 8)) or by[("shardline 2 workers", streams[-1])]
    args.partial = args.quick or bool(args.streams) or args.no_ttft
    lines = [
        "| system | streams | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|",
        *(row(r) for r in results),
        "",
        f"- (b)/(a) at one stream: {b1.tps / a1.tps:.3f} (target >= 0.95)",
        f"- (c) at {c8.streams} streams / (c) at one stream: {c8.tps / c1.tps:.2f}x "
        "(target >= 1.7x)",
        f"- TTFT of a {long}-token prompt on 2 workers: chunked (256) {chunked * 1e3:.0f} ms, "
        f"whole {whole * 1e3:.0f} ms, ratio {chunked / whole:.2f} (target <= 0.7)",
    ]
    if not args.partial:
        plot(results, ROOT / "bench" / ("serving-gpu.png" if args.gpu else "serving.png"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true",
                        help="bigger model, no core pinning, results in RESULTS-gpu.md")
    parser.add_argument("--streams", help="comma-separated stream counts (no results written)")
    parser.add_argument("--no-ttft", action="store_true",
                        help="skip the long-prompt TTFT comparison (no results written)")
    parser.add_argument("--mlx-lm", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PIN
    PIN = not args.gpu
    if args.mlx_lm:
        path, streams, prompt_len, new = args.mlx_lm
        return run_mlx_lm(path, int(streams), int(prompt_len), int(new))
    report = asyncio.run(main_async(args))
    print(report)
    if not args.partial:
        (ROOT / "bench" / ("RESULTS-gpu.md" if args.gpu else "RESULTS.md")).write_text(
            header(args) + report + f"\n\n![]({'serving-gpu' if args.gpu else 'serving'}.png)\n")


def header(args: argparse.Namespace) -> str:
    spec = GPU_SPEC if args.gpu else SPEC
    shape = (f"{spec.family}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
             f"{spec.dtype}")
    mlx_lm_note = ("mlx-lm serves one stream with `stream_generate` and several with "
                   "`batch_generate`, which does not stream, so its TTFT and ITL are measured at "
                   "one stream only.")
    if args.gpu:
        from worker.backend import detect

        where = (f"{detect().chip}; mlx-lm and every worker share that one "
                 f"GPU (the 2-worker rows measure pipelining overhead, not added compute)")
        cmd = "python bench/bench_serving.py --gpu"
    else:
        where = (f"{os.cpu_count()} CPU cores, mlx-lm pinned to core 0, workers pinned to "
                 "cores 0 and 1; the coordinator and the clients are not pinned (the compute "
                 "gets one core in (a) and (b) alike; the coordinator's work runs beside it, as "
                 "on a Mac whose GPU computes while its CPU cores are free)")
        cmd = "python bench/bench_serving.py"
    return (f"# Serving benchmark\n\nModel: {spec.key()} ({shape}), {where}. Command: "
            f"`{cmd}`. {mlx_lm_note}\n\n")


if __name__ == "__main__":
    main()
