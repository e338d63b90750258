"""Structured output benchmark: decode tokens/s with and without a JSON schema, same run.

One cluster, the same prompts; each stream count runs free, then under a JSON schema (an array
of at least 10000 objects with a free string and an integer each, so no output ends before
max_tokens and every step computes a mask, large inside strings). Prints tokens/s of both, the
ratio (target >= 0.9), and the host time of one mask (worker/constrain.py) measured apart.

    python bench/bench_structured.py                 # CPU: the bench model, 1 worker, 1 and 8
    python bench/bench_structured.py --gpu           # GPU: the 8B-shaped 4-bit llama
    python bench/bench_structured.py --workers 3     # through 3 workers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_hotpath import GPU_SPEC  # noqa: E402
from bench_serving import GiB, prompts  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402

SCHEMA = {"type": "array", "minItems": 10000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "n"],
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}}


async def stream_tps(stub, streams: int, prompt_len: int, new: int, schema: bool) -> float:
    from protos import inference_pb2

    tokens = 0

    async def one(ids: list[int]) -> None:
        nonlocal tokens
        sampling = inference_pb2.SamplingParams(max_tokens=new)
        if schema:
            sampling.json_schema = json.dumps(SCHEMA)
        async for msg in stub.Generate(inference_pb2.GenerateRequest(prompt_token_ids=ids,
                                                                     sampling=sampling)):
            tokens += len(msg.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts(streams, prompt_len)))
    return tokens / (time.perf_counter() - t0)


async def cluster(path: Path, workers: int, streams: list[int], args: argparse.Namespace,
                  pin: bool) -> dict[tuple[int, bool], list[float]]:
    import grpc

    from coordinator.app import Coordinator, ServeOptions
    from coordinator.local import LocalWorkers
    from protos import inference_pb2_grpc

    local = LocalWorkers(workers, memory=[(4 if pin else 32) * GiB] * workers,
                         cpus=[0] * workers if pin else None, fresh_cache=True)
    addresses = local.start(timeout=300)
    coord = Coordinator(ServeOptions(model=str(path), workers=addresses, host="127.0.0.1",
                                     grpc_port=0, max_sequences=max(streams), context=4096,
                                     prefix_cache_tokens=0), progress=lambda m: None)
    out: dict[tuple[int, bool], list[float]] = {}
    try:
        await coord.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{coord.grpc_port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for s in streams:
                for schema in (False, True):
                    await stream_tps(stub, s, args.prompt, 8, schema)  # warm-up
                for _ in range(args.runs):  # interleaved, so drift hits both alike
                    for schema in (False, True):
                        out.setdefault((s, schema), []).append(
                            await stream_tps(stub, s, args.prompt, args.new, schema))
    finally:
        await coord.stop()
        local.stop()
    return out


def mask_cost(path: Path, n: int = 200) -> tuple[float, float]:
    """(median, p90) microseconds of one mask under SCHEMA, following a sampled output."""
    import mlx.core as mx

    from coordinator.api.structured import grammar_of
    from protos import inference_pb2
    from worker.constrain import Constraint, GrammarTokenizer

    tok = GrammarTokenizer(path).get()
    grammar = grammar_of(inference_pb2.SamplingParams(json_schema=json.dumps(SCHEMA)))
    c = Constraint(tok, grammar, 0)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    history: list[int] = []
    times = []
    key = mx.random.key(0)
    for _ in range(n):
        t0 = time.perf_counter()
        allowed = c.allowed(history, vocab)
        mx.eval(allowed)
        times.append(time.perf_counter() - t0)
        key, sub = mx.random.split(key)
        logits = mx.where(allowed, mx.random.normal((1, vocab), key=sub), -mx.inf)
        history.append(int(mx.argmax(logits, axis=-1).item()))
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 8B shape, nothing pinned")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    spec = GPU_SPEC if args.gpu else bench_serving.SPEC
    pin = not args.gpu and hasattr(os, "sched_setaffinity")
    path = cached_model(spec)
    streams = [int(s) for s in args.streams.split(",")]
    got = asyncio.run(cluster(path, args.workers, streams, args, pin))
    median, p90 = mask_cost(path)
    print(f"model {spec.key()}, {args.workers} worker(s), prompt {args.prompt}, {args.new} new "
          f"tokens, greedy, medians of {args.runs} interleaved runs, "
          f"{'GPU' if args.gpu else 'CPU, workers pinned to core 0'}")
    print("| streams | free tok/s | JSON schema tok/s | ratio (target >= 0.9) |")
    print("|---|---|---|---|")
    for s in streams:
        free, constrained = (statistics.median(got[(s, b)]) for b in (False, True))
        print(f"| {s} | {free:.1f} | {constrained:.1f} | {constrained / free:.2f} |")
    print(f"one mask on the host: median {median:.0f} us, p90 {p90:.0f} us "
          f"(vocab {spec.vocab_size}, of which the demo tokenizer fills 512)")


if __name__ == "__main__":
    main()
