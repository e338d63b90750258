"""TLS benchmark: decode tokens/s through 2 workers with and without mutual TLS, same run.

Two clusters of the same model, one plain and one whose workers and coordinator hold
certificates of one cluster CA (`coordinator certs`); each stream count runs on both,
interleaved, and the ratio is printed.

    python bench/bench_tls.py                 # CPU: the bench model, 2 workers, 1 and 4 streams
    python bench/bench_tls.py --gpu           # GPU: the 8B-shaped 4-bit llama
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_hotpath import GPU_SPEC  # noqa: E402
from bench_serving import GiB, bench_shardline  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402
from protos import tls  # noqa: E402


async def run(path: Path, certs: Path | None, streams: list[int], args: argparse.Namespace
              ) -> dict[int, list[float]]:
    from coordinator.app import Coordinator, ServeOptions
    from coordinator.local import LocalWorkers

    files = [certs / n for n in ("127.0.0.1.crt", "127.0.0.1.key", "ca.crt")] if certs else []
    extra = [a for flag, f in zip(("--tls-cert", "--tls-key", "--tls-ca"), files, strict=False)
             for a in (flag, str(f))]
    local = LocalWorkers(args.workers, memory=[8 * GiB] * args.workers, extra_args=extra,
                         fresh_cache=True)
    coord = Coordinator(ServeOptions(model=str(path), workers=local.start(timeout=300),
                                     host="127.0.0.1", grpc_port=0, http_port=0,
                                     max_sequences=max(streams), context=4096,
                                     prefix_cache_tokens=0, tls=tls.TLS.load(*files)
                                     if files else None), progress=lambda m: None)
    out: dict[int, list[float]] = {}
    try:
        await coord.start()
        for s in streams:
            await bench_shardline(coord, "warm", s, args.prompt, 8)
            out[s] = [(await bench_shardline(coord, "x", s, args.prompt, args.new,
                                             warm=False)).tps for _ in range(args.runs)]
    finally:
        await coord.stop()
        local.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    spec = GPU_SPEC if args.gpu else bench_serving.SPEC
    bench_serving.PIN = False
    path = cached_model(spec)
    certs = Path(tempfile.mkdtemp())
    tls.make_certs(certs, ["127.0.0.1"])
    streams = [int(s) for s in args.streams.split(",")]
    plain = asyncio.run(run(path, None, streams, args))
    secure = asyncio.run(run(path, certs, streams, args))
    print(f"model {spec.key()}, {args.workers} workers on this machine, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, medians of {args.runs} runs")
    print("| streams | plain tok/s | mutual TLS tok/s | ratio |")
    print("|---|---|---|---|")
    for s in streams:
        a, b = statistics.median(plain[s]), statistics.median(secure[s])
        print(f"| {s} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
