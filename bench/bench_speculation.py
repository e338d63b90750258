"""Speculative decoding benchmark: one stream through N workers with and without proposals.

Same run, same workers, same prompt; decode tokens/s of Shardline without speculation, with a
draft model that agrees with the target most of the time, and with prompt lookup (ngram), the
ratios to the plain run and to mlx-lm alone, and the share of proposals confirmed.

The agreeing draft is built honestly: the target's layers after the first few barely change the
residual (their output projections scaled by 0.05, `ModelSpec.quiet_after`), and the draft is
the target's first layers with its embedding and head (`coordinator.demo.draft_model`).
Prompt lookup is also measured where it pays: on a model whose continuation repeats text its
prompt holds (every layer quiet and its head mapping each token to the next of a 16-id cycle,
`ModelSpec.cycle`; the prompt is that cycle), against the same model without speculation.

    python bench/bench_speculation.py            # CPU: 8 layers (hidden 512), 3 workers
    python bench/bench_speculation.py --gpu      # GPU: the 8B-shaped 4-bit llama, 3 workers
    python bench/bench_speculation.py --tiny     # CPU: 6 layers of hidden 128, nothing pinned:
                                                 # the hops, not the compute, set the pace
    python bench/bench_speculation.py --no-random  # only prompt lookup on the repeating model

On the CPU every worker and mlx-lm run pinned to core 0 (not with --tiny); the coordinator (and
the draft model it runs) and the client share the other core. Fresh workers first serve two
requests with the draft under a throwaway coordinator, then each row's coordinator warms up
with one request of its own before its timed runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_profile import PARTS, stage_times  # noqa: E402
from bench_serving import GiB, bench_mlx_lm  # noqa: E402

from coordinator.demo import ModelSpec, cached_model, cycle_prompt, draft_model  # noqa: E402
from worker.metrics import STEP_KINDS  # noqa: E402 - the steps a worker times apart

CPU_SPEC = ModelSpec(family="llama", num_layers=8, hidden_size=512, intermediate_size=1536,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                     max_position_embeddings=4096, quiet_after=2)
# 28 quiet layers: each scaled by 0.01, so that together they move the residual about as much
# as the CPU models' 6 layers at 0.05 do
GPU_SPEC = ModelSpec(family="llama", num_layers=32, hidden_size=4096, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, bits=4,
                     max_position_embeddings=4096, quiet_after=4, quiet_scale=0.01)
TINY_SPEC = ModelSpec(family="llama", num_layers=6, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                      max_position_embeddings=4096, quiet_after=2)
CYCLE = 16  # the repeating model's cycle (ModelSpec.cycle; demo.cycle_prompt's block)


def prompt(length: int) -> list[int]:
    """A prompt that repeats a 16-token phrase (prompt lookup finds copies in it)."""
    phrase = [(37 * j) % 1900 + 20 for j in range(16)]
    return (phrase * (length // 16 + 1))[:length]


def print_parts(before: list[dict], after: list[dict]) -> None:
    """Each worker's mean ms per step of each part (bench_profile.py), by the step's kind,
    between two scrapes."""
    for i, (b_kinds, a_kinds) in enumerate(zip(before, after, strict=True)):
        for kind in STEP_KINDS:
            b, a = b_kinds[kind], a_kinds[kind]
            steps = a["host"][1] - b["host"][1]
            if not steps:
                continue
            cells = ", ".join(f"{p} {(a[p][0] - b[p][0]) / steps * 1e3:.2f}" for p in PARTS)
            print(f"  stage {i}, {int(steps)} {kind} steps, ms a step: {cells}", flush=True)
        outcomes = {o: a_kinds["ahead"][o] - b_kinds["ahead"].get(o, 0.0)
                    for o in a_kinds["ahead"]}
        print(f"  stage {i}, steps built ahead: "
              + ", ".join(f"{o} {int(n)}" for o, n in sorted(outcomes.items())), flush=True)


async def one_stream(coordinator, ids: list[int], new: int
                     ) -> tuple[float, int, int, tuple[int, ...]]:
    """(decode tokens/s, proposed, confirmed, the tokens) of one greedy request."""
    import grpc

    from protos import inference_pb2, inference_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        req = inference_pb2.GenerateRequest(
            prompt_token_ids=ids, sampling=inference_pb2.SamplingParams(max_tokens=new))
        usage, tokens = None, []
        async for msg in stub.Generate(req):
            tokens += msg.token_ids
            if msg.HasField("usage"):
                usage = msg.usage
    return (usage.decode_tokens_per_second, usage.draft_tokens, usage.accepted_draft_tokens,
            tuple(tokens))


async def variant(path: Path, addresses: list[str], ids: list[int], new: int, runs: int,
                  report: bool = True, **options) -> list[tuple[float, int, int, tuple]]:
    from coordinator.app import Coordinator, ServeOptions

    coord = Coordinator(ServeOptions(model=str(path), workers=addresses, host="127.0.0.1",
                                     grpc_port=0, http_port=0, context=4096,
                                     prefix_cache_tokens=0, **options),
                        progress=lambda m: None)
    try:
        await coord.start()
        # warm-up with the timed length: every chunk shape of the proposals is met once (on a
        # GPU the first of each compiles its kernels)
        started = time.perf_counter()
        await one_stream(coord, ids, new)
        warm_up = time.perf_counter() - started
        ports = [w.info.metrics_port for w in coord.cluster.workers]
        before = [stage_times(p) for p in ports]
        spec = coord.engine.speculator if coord.engine else None
        waited = (spec.proposals_awaited, spec.proposal_seconds) if spec else (0, 0.0)
        out = [await one_stream(coord, ids, new) for _ in range(runs)]
        if not report:
            return out
        print(f"warm-up request: {warm_up:.1f} s", flush=True)
        print_parts(before, [stage_times(p) for p in ports])
        if spec is not None and spec.proposals_awaited > waited[0]:
            n = spec.proposals_awaited - waited[0]
            print(f"waiting for proposals: {(spec.proposal_seconds - waited[1]) / n * 1e3:.2f} "
                  f"ms a step ({n} steps)", flush=True)
        if coord.draft is not None:
            print(f"rounds drafted ahead: {coord.draft.ahead_taken} used, "
                  f"{coord.draft.ahead_missed} not (the draft on {coord.draft.device}, the "
                  f"workers on {sorted({w.info.device for w in coord.cluster.workers})}; "
                  f"drafting ahead: {spec.drafts_ahead() if spec else '-'})", flush=True)
        if spec is not None:  # what the serve learned a round costs (spec_depth.py)
            costs = spec.costs
            timed = ", ".join(f"{k}: {costs.rounds[k]} x {costs.seconds[k] * 1e3:.2f} ms"
                              for k in sorted(costs.rounds))
            line = costs.estimate(spec.num_draft_tokens)
            fitted = ", ".join(f"{k}: {s * 1e3:.2f}" for k, s in line.items()) if line else "-"
            print(f"steps by proposals (count x median ms of the last 9): {timed}; "
                  f"fitted ms: {fitted}",
                  flush=True)
        return out
    finally:
        await coord.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU: a tiny model, nothing pinned (per-hop costs dominate)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--quiet-scale", type=float, default=None,
                        help="scale of the quiet layers' output projections (the model's "
                             "default if not given): smaller, the draft agrees more often")
    parser.add_argument("--pad-rows", default="",
                        help="comma-separated SHARDLINE_PAD_ROWS settings to compare, each on "
                             "freshly started workers ('' = the backend's default; 1 = never "
                             "pad; worker/backend.py row_floor)")
    parser.add_argument("--also-draft-ahead", choices=("0", "1"), default=None,
                        help="also a row with the draft model drafting the next round during "
                             "the check (1) or not (0) whatever its device "
                             "(SHARDLINE_DRAFT_AHEAD), in turn with the others: what drafting "
                             "ahead brings or costs (by default not where a stage shares the "
                             "draft's GPU: coordinator/serving/speculation.py drafts_ahead)")
    parser.add_argument("--random", action=argparse.BooleanOptionalAction, default=True,
                        help="the rows on the random quiet model: no speculation, the draft "
                             "model, prompt lookup (--no-random: only the repeating model's)")
    parser.add_argument("--repeating", action=argparse.BooleanOptionalAction, default=True,
                        help="also run prompt lookup on a model that repeats its prompt (builds "
                             "a second model: minutes for the 8B shape)")
    args = parser.parse_args()
    spec = GPU_SPEC if args.gpu else TINY_SPEC if args.tiny else CPU_SPEC
    if args.quiet_scale is not None:
        spec = dataclasses.replace(spec, quiet_scale=args.quiet_scale)
    pin = not args.gpu and not args.tiny and hasattr(os, "sched_setaffinity")
    bench_serving.PIN = pin
    path = cached_model(spec)
    draft = draft_model(path, spec.quiet_after) if args.random else None

    base = [bench_mlx_lm(path, 1, args.prompt, args.new).tps for _ in range(args.runs)]
    print("mlx-lm alone: " + ", ".join(f"{b:.1f}" for b in base) + " tok/s", flush=True)
    rows, plain_of = {}, {}  # row name -> results; -> its "no speculation" row
    draft_options = {"draft_model": str(draft), "num_draft_tokens": args.num_draft_tokens}
    ngram_options = {"speculative": "ngram", "num_draft_tokens": args.num_draft_tokens}

    def measure(model: Path, ids: list[int], variants: list[tuple[str, dict]], label: str,
                pad: str = "") -> None:
        """Each variant's runs on the same freshly started workers serving `model`, in
        rounds: a coordinator per variant and round (warmed up with one full-length run)."""
        from coordinator.local import LocalWorkers

        local = LocalWorkers(args.workers, memory=[(4 if pin else 32) * GiB] * args.workers,
                             cpus=[0] * args.workers if pin else None, fresh_cache=True)
        if pad:
            local.env["SHARDLINE_PAD_ROWS"] = pad
        addresses = local.start(timeout=600)
        try:  # one run of each variant per round, so that a slow spell hits them alike
            # the workers first meet the checks of a warm-up request and of a request after it
            # (whose sizes follow the round costs the first taught) under a throwaway
            # coordinator: on a GPU, whichever speculating row came first on fresh workers ran
            # its first timed round slower (bench/RESULTS-speculation.md, "drafting ahead or
            # not")
            if any(o.get("draft_model") for _, o in variants):
                started = time.perf_counter()
                asyncio.run(variant(model, addresses, ids, args.new, 1, report=False,
                                    **draft_options))
                print(f"workers warmed up with the draft: {time.perf_counter() - started:.1f} s",
                      flush=True)
            for r in range(args.runs):
                for name, options in variants:
                    plain_of[name + label] = "no speculation" + label
                    options = dict(options)
                    ahead = options.pop("draft_ahead", None)
                    if ahead is not None:  # read by this process's coordinator, step by step
                        os.environ["SHARDLINE_DRAFT_AHEAD"] = ahead
                    try:
                        got = asyncio.run(variant(model, addresses, ids, args.new, 1,
                                                  report=r == args.runs - 1, **options))
                    finally:
                        os.environ.pop("SHARDLINE_DRAFT_AHEAD", None)
                    rows.setdefault(name + label, []).extend(got)
                    print(f"round {r + 1}, {name}{label}: "  # kept if the run is cut short
                          + ", ".join(f"{g[0]:.1f} tok/s, {g[2]}/{g[1]} confirmed" for g in got),
                          flush=True)
        finally:
            local.stop()

    drafts = [(f"draft model ({spec.quiet_after} layers)", draft_options)]
    if args.also_draft_ahead is not None:
        how = "drafting ahead" if args.also_draft_ahead == "1" else "not drafting ahead"
        drafts.append((f"draft model ({spec.quiet_after} layers), {how}",
                       draft_options | {"draft_ahead": args.also_draft_ahead}))
    for pad in args.pad_rows.split(",") if args.random else []:
        measure(path, prompt(args.prompt), [
            ("no speculation", {}), *drafts, ("prompt lookup (ngram)", ngram_options),
        ], f", SHARDLINE_PAD_ROWS={pad}" if pad else "", pad)
    if args.repeating:  # prompt lookup where it pays: a model that repeats its prompt
        repeating = dataclasses.replace(spec, quiet_after=0, cycle=CYCLE)
        measure(cached_model(repeating), cycle_prompt(args.prompt, CYCLE), [
            ("no speculation", {}), ("prompt lookup (ngram)", ngram_options),
        ], ", repeating model")

    mlx = statistics.median(base)
    where = "GPU" if args.gpu else "CPU, workers and mlx-lm pinned to core 0" if pin else \
        "CPU, nothing pinned"
    print(f"model {spec.key()} (layers after {spec.quiet_after} scaled by {spec.quiet_scale}), "
          f"{args.workers} workers,"
          f" prompt {args.prompt} (a repeated 16-token phrase), {args.new} new tokens, greedy, "
          f"K = {args.num_draft_tokens}, medians of {args.runs} runs (one of each row per "
          f"round), {where}")
    print("| system | decode tok/s | vs no speculation | vs mlx-lm alone | confirmed | "
          "tokens as without |")
    print("|---|---|---|---|---|---|")
    print(f"| mlx-lm alone (1 process) | {mlx:.1f} | | 1.00x | | |")
    for name, results in rows.items():
        tps = statistics.median(r[0] for r in results)
        plain = statistics.median(r[0] for r in rows[plain_of[name]])
        drafted = sum(r[1] for r in results)
        accepted = sum(r[2] for r in results)
        share = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "-"
        versus = "" if "repeating" in name else f"{tps / mlx:.2f}x"  # mlx-lm ran the other
        # greedy: every run of a row gives the tokens of the runs without speculation
        same = len({r[3] for r in results} | {r[3] for r in rows[plain_of[name]]}) == 1
        print(f"| Shardline, {name} | {tps:.1f} | {tps / plain:.2f}x | {versus} | {share} | "
              f"{'same' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
