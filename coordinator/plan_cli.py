"""`coordinator plan`: print how a model would be split over given memories, with no worker.

    coordinator plan --model mlx-community/Llama-3.2-3B-Instruct-4bit \
        --memory 16GiB,24GiB,64GiB --bandwidth 120,273,546

Relies on coordinator.cluster.modelinfo (sizes from headers) and coordinator.cluster.planner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from coordinator.cluster.modelinfo import ModelError, check_family, read_model_info, resolve_model
from coordinator.cluster.planner import (
    DEFAULT_PREFIX_CACHE_TOKENS,
    PARTITIONS,
    NodeCapacity,
    PlanError,
    plan,
)
from protos.units import parse_size


def add_plan_parser(subparsers: Any) -> None:
    """Register the `plan` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="print the layer split and its memory/speed estimate without any worker",
        description="Print how a model's layers would be split over workers of the given "
        "memory (and bandwidth), with the memory each needs and a speed estimate.",
    )
    p.add_argument("--model", required=True, help="local MLX model directory or HF repo id")
    p.add_argument(
        "--memory", required=True,
        help="usable memory per worker, in pipeline order: 16GiB,24GiB,64GiB "
        "(optionally named: mini=16GiB,studio=64GiB)",
    )
    p.add_argument("--bandwidth", help="memory bandwidth per worker in GB/s: 120,273,546")
    p.add_argument("--partition", choices=PARTITIONS, default="memory")
    p.add_argument("--context", type=int, help="tokens of KV cache to reserve per sequence "
                   "(default: the model's maximum, at most 4096)")
    p.add_argument("--max-sequences", type=int, default=4,
                   help="concurrent sequences to reserve KV cache for (default 4)")
    p.add_argument("--prefix-cache-tokens", type=int, default=DEFAULT_PREFIX_CACHE_TOKENS,
                   help="tokens of finished sequences the prefix cache keeps on every stage, "
                   f"reserved too, as `serve` does (default {DEFAULT_PREFIX_CACHE_TOKENS}; "
                   "0: none)")
    p.set_defaults(func=run_plan)


def parse_nodes(memory: str, bandwidth: str | None = None) -> list[NodeCapacity]:
    """Workers from `--memory` and `--bandwidth` lists; unnamed ones are w0, w1, ...

    >>> parse_nodes("a=1GiB,2GiB", "100,200")[1]
    NodeCapacity(name='w1', memory_bytes=2147483648, bandwidth_gbps=200.0)
    """
    items = [item.strip() for item in memory.split(",")]
    bandwidths: list[float | None] = [None] * len(items)
    if bandwidth:
        bandwidths = [_parse_bandwidth(b) for b in bandwidth.split(",")]
        if len(bandwidths) != len(items):
            raise ValueError(
                f"--memory lists {len(items)} workers but --bandwidth lists {len(bandwidths)}"
            )
    nodes = []
    for i, (item, bw) in enumerate(zip(items, bandwidths, strict=True)):
        name, _, size = item.rpartition("=")
        nodes.append(NodeCapacity(name.strip() or f"w{i}", parse_size(size), bw))
    return nodes


def _parse_bandwidth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a bandwidth in GB/s: {text.strip()!r}") from None
    if not value > 0:
        raise ValueError(f"bandwidth must be positive: {text.strip()!r}")
    return value


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; on a bad model, flag or a model that does not fit, one error line and 2."""
    try:
        nodes = parse_nodes(args.memory, args.bandwidth)
        path = resolve_model(args.model)
        model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
        info = read_model_info(path, model_id=model_id)
        check_family(info)
        result = plan(
            info, nodes, partition=args.partition, context=args.context,
            max_sequences=args.max_sequences, prefix_cache_tokens=args.prefix_cache_tokens,
        )
    except (ModelError, PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0
