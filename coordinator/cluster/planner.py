"""Split a model's layers into contiguous stages over worker nodes, within each node's memory.

Relies on `ModelInfo` (coordinator.cluster.modelinfo) for exact per-stage bytes. Stage i always
runs on
nodes[i]. Two partitions:
- `memory`: layers in proportion to usable memory, then the fewest layer moves that make every
  stage fit (an exact dynamic program over boundaries, so neighbours with slack absorb the excess).
- `balanced`: the smallest possible slowest stage (weight bytes / bandwidth) that fits, and among
  those the smallest sum of stage times, then the split closest to `memory`'s proportions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from typing import Any

from coordinator.cluster.modelinfo import ModelInfo
from protos.units import format_size

PARTITIONS = ("memory", "balanced")
DEFAULT_CONTEXT = 4096
DEFAULT_PREFIX_CACHE_TOKENS = 4096  # `serve --prefix-cache-tokens` and `plan` default


class PlanError(Exception):
    """The model cannot be placed on these nodes; the message gives needed vs available bytes."""


@dataclass(frozen=True)
class NodeCapacity:
    """A worker as the planner sees it: usable memory and, if known, memory bandwidth in GB/s."""

    name: str
    memory_bytes: int
    bandwidth_gbps: float | None = None


@dataclass(frozen=True)
class StagePlan:
    """Layers [layer_start, layer_end) on one node, with the bytes they need there."""

    node: NodeCapacity
    layer_start: int
    layer_end: int
    weight_bytes: int
    kv_bytes: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def seconds_per_token(self) -> float | None:
        """Time to stream this stage's weights once (decode is memory-bound); None if unknown."""
        bandwidth = self.node.bandwidth_gbps
        return self.weight_bytes / (bandwidth * 1e9) if bandwidth else None


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order, and the context, batch and prefix cache the KV reservation
    was made for."""

    model_id: str
    partition: str
    stages: tuple[StagePlan, ...]
    context: int
    max_sequences: int
    reserve_fraction: float = 0.0
    prefix_cache_tokens: int = 0

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layer_end if self.stages else 0

    @property
    def seconds_per_token(self) -> float | None:
        """One token's trip through every stage; None unless every node's bandwidth is known."""
        times = [stage.seconds_per_token for stage in self.stages]
        return sum(t for t in times if t is not None) if None not in times else None

    def capacity(self, stage: StagePlan) -> int:
        """What the plan let the stage's node fill: its memory less the reserve."""
        return usable_bytes(stage.node, self.reserve_fraction)

    def describe(self) -> str:
        """A readable table, one row per stage and a total row with the speed's upper bound."""
        rows = [["stage", "node", "layers", "weights", "KV", "capacity", "use", "ms/token"]]
        for i, stage in enumerate(self.stages):
            rows.append([
                str(i), stage.node.name, f"[{stage.layer_start}, {stage.layer_end})",
                *_sizes(stage.weight_bytes, stage.kv_bytes, self.capacity(stage)),
                _ms(stage.seconds_per_token),
            ])
        weights = sum(s.weight_bytes for s in self.stages)
        kv = sum(s.kv_bytes for s in self.stages)
        capacity = sum(self.capacity(s) for s in self.stages)
        total = self.seconds_per_token
        rows.append([
            "total", f"{len(self.stages)} nodes", f"{self.num_layers} layers",
            *_sizes(weights, kv, capacity),
            _ms(total) + (f"  => <= {1 / total:.1f} tokens/s" if total else ""),
        ])
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        reserve = f", {self.reserve_fraction:.0%} of memory held back" * bool(self.reserve_fraction)
        lines = [
            f"model {self.model_id}: partition {self.partition}, KV reserved for "
            f"{_kv_tokens(self.max_sequences, self.context, self.prefix_cache_tokens)}{reserve}"
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.append(
            "(pass every node's bandwidth for a speed estimate)" if total is None else
            "(estimate: each stage streams its weights once per token; network time not counted)"
        )
        return "\n".join(line.rstrip() for line in lines)


def _kv_tokens(max_sequences: int, context: int, prefix_cache_tokens: int) -> str:
    """What the KV reservation holds, in words.

    >>> _kv_tokens(4, 4096, 4096)
    '4 x 4096 tokens + 4096 prefix-cache tokens'
    """
    extra = f" + {prefix_cache_tokens} prefix-cache tokens" if prefix_cache_tokens else ""
    return f"{max_sequences} x {context} tokens{extra}"


def _sizes(weights: int, kv: int, capacity: int) -> list[str]:
    use = f"{100 * (weights + kv) / capacity:.0f}%"
    return [format_size(weights), format_size(kv), format_size(capacity), use]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def usable_bytes(node: NodeCapacity, reserve_fraction: float = 0.0) -> int:
    """The node's memory less the fraction held back for the OS and activations."""
    return int(node.memory_bytes * (1.0 - reserve_fraction))


def kv_reservation(info: ModelInfo, start: int, end: int, context: int, max_sequences: int,
                   prefix_cache_tokens: int = 0) -> int:
    """KV cache bytes for layers [start, end): max_sequences sequences at full context, plus
    the finished sequences the prefix cache keeps live on every stage (up to its tokens)."""
    return info.kv_bytes(start, end) * (context * max_sequences + prefix_cache_tokens)


def plan(
    info: ModelInfo,
    nodes: Sequence[NodeCapacity],
    *,
    partition: str = "memory",
    context: int | None = None,
    max_sequences: int = 4,
    reserve_fraction: float = 0.0,
    prefix_cache_tokens: int = 0,
) -> Plan:
    """Assign contiguous layer ranges to `nodes` in order; raise PlanError if none fits.

    Every stage reserves KV for `max_sequences` x `context` tokens and for the
    `prefix_cache_tokens` the prefix cache may keep (coordinator/serving/prefix_cache.py).
    """
    context = min(info.max_context, DEFAULT_CONTEXT) if context is None else context
    _validate(info, nodes, partition, context, max_sequences, reserve_fraction)
    if prefix_cache_tokens < 0:
        raise ValueError("prefix_cache_tokens must be >= 0")
    capacities = [usable_bytes(node, reserve_fraction) for node in nodes]

    def kv(start: int, end: int) -> int:
        return kv_reservation(info, start, end, context, max_sequences, prefix_cache_tokens)

    def need(start: int, end: int) -> int:
        return info.stage_bytes(start, end) + kv(start, end)

    def fits(i: int, start: int, end: int) -> bool:
        return need(start, end) <= capacities[i]

    _check_total(info, nodes, capacities, context, max_sequences, prefix_cache_tokens)
    targets = proportional_boundaries(info.num_layers, capacities)
    if partition == "memory":
        bounds = _memory_split(info.num_layers, fits, targets)
    else:
        bounds = _balanced_split(info, nodes, fits, targets)
    if bounds is None:
        raise PlanError(_fragmentation_message(info, nodes, capacities, need, targets))
    stages = tuple(
        StagePlan(
            node=node, layer_start=a, layer_end=b, weight_bytes=info.stage_bytes(a, b),
            kv_bytes=kv(a, b),
        )
        for node, (a, b) in zip(nodes, pairwise(bounds), strict=True)
    )
    return Plan(info.model_id, partition, stages, context, max_sequences, reserve_fraction,
                prefix_cache_tokens)


def _validate(
    info: ModelInfo, nodes: Sequence[NodeCapacity], partition: str, context: int,
    max_sequences: int, reserve_fraction: float,
) -> None:
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose {' or '.join(PARTITIONS)}")
    if context <= 0 or max_sequences <= 0:
        raise ValueError("context and max_sequences must be positive")
    if not 0.0 <= reserve_fraction < 1.0:
        raise ValueError("reserve_fraction must be in [0, 1)")
    for node in nodes:
        if node.memory_bytes <= 0:
            raise ValueError(f"node {node.name} has no memory")
        if node.bandwidth_gbps is not None and node.bandwidth_gbps <= 0:
            raise ValueError(f"node {node.name} has a non-positive bandwidth")
    if not nodes:
        raise PlanError("no workers to place the model on")
    if len(nodes) > info.num_layers:
        raise PlanError(
            f"{len(nodes)} workers but the model has only {info.num_layers} layers; "
            "every worker needs at least one layer"
        )


def _check_total(
    info: ModelInfo, nodes: Sequence[NodeCapacity], capacities: Sequence[int], context: int,
    max_sequences: int, prefix_cache_tokens: int = 0,
) -> None:
    # With several stages a tied embedding is loaded twice: by the first and by the last.
    weights = info.stage_bytes(0, info.num_layers)
    if len(nodes) > 1:
        weights = info.weight_bytes + (info.head_bytes if info.tied else 0)
    kv = kv_reservation(info, 0, info.num_layers, context, max_sequences, prefix_cache_tokens)
    if weights + kv > sum(capacities):
        raise PlanError(
            f"model needs {format_size(weights + kv)} (weights {format_size(weights)} + KV "
            f"{format_size(kv)} for {_kv_tokens(max_sequences, context, prefix_cache_tokens)})"
            f" but the workers have {format_size(sum(capacities))}: "
            f"{_list_nodes(nodes, capacities)}"
        )


def _list_nodes(nodes: Sequence[NodeCapacity], sizes: Sequence[int]) -> str:
    return ", ".join(f"{n.name} {format_size(s)}" for n, s in zip(nodes, sizes, strict=True))


def _fragmentation_message(
    info: ModelInfo, nodes: Sequence[NodeCapacity], capacities: Sequence[int],
    need: Callable[[int, int], int], targets: Sequence[int],
) -> str:
    per_node = ", ".join(
        f"{n.name} needs {format_size(need(a, b))} of {format_size(c)}"
        for n, c, (a, b) in zip(nodes, capacities, pairwise(targets), strict=True)
    )
    return (
        f"no contiguous split of {info.num_layers} layers fits the workers (largest layer "
        f"{format_size(max(info.layer_bytes))}); the proportional split: {per_node}"
    )


def proportional_boundaries(num_layers: int, weights: Sequence[int]) -> list[int]:
    """Stage boundaries [0, ..., num_layers] giving layers in proportion to `weights`.

    Largest-remainder rounding, ties to the earlier node; every stage gets at least one layer
    (taken from the stage most above its quota).

    >>> proportional_boundaries(12, [1, 2, 3])
    [0, 2, 6, 12]
    """
    total = sum(weights)
    quotas = [Fraction(num_layers * w, total) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: num_layers - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0:
            donor = max(
                (j for j in range(len(counts)) if counts[j] > 1),
                key=lambda j: (counts[j] - quotas[j], j),  # ties: the later node gives
            )
            counts[donor] -= 1
            counts[i] = 1
    return [0, *(sum(counts[: i + 1]) for i in range(len(counts)))]


def _split(
    num_layers: int,
    num_stages: int,
    allowed: Callable[[int, int, int], bool],
    score: Callable[[int, int, int], Any],
    combine: Callable[[Any, Any], Any],
    start: Any,
) -> tuple[Any, list[int]] | None:
    """The best contiguous split by an exact DP over (stage, end boundary).

    Stage i = [a, b) may be used when `allowed(i, a, b)`; a split's value folds `combine` over
    its stages' `score(i, a, b)`, from `start`, and the smallest wins (on ties each stage keeps
    the earliest start, so plans are deterministic). `combine` must be monotone (sum or max),
    which makes the DP exact.
    """
    best: list[dict[int, tuple[Any, int]]] = [{0: (start, 0)}]
    for i in range(num_stages):
        last = i == num_stages - 1
        ends = [num_layers] if last else range(i + 1, num_layers - (num_stages - i - 1) + 1)
        row: dict[int, tuple[Any, int]] = {}
        for b in ends:
            for a, (value, _) in best[i].items():
                if a < b and allowed(i, a, b):
                    candidate = combine(value, score(i, a, b))
                    if b not in row or candidate < row[b][0]:
                        row[b] = (candidate, a)
        best.append(row)
    if num_layers not in best[num_stages]:
        return None
    bounds = [num_layers]
    for i in range(num_stages, 0, -1):
        bounds.append(best[i][bounds[-1]][1])
    return best[num_stages][num_layers][0], bounds[::-1]


def _add(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(p + q for p, q in zip(x, y, strict=True))


def _stage_picoseconds(
    info: ModelInfo, nodes: Sequence[NodeCapacity]
) -> Callable[[int, int, int], int]:
    """Stage i's weight streaming time in integer picoseconds, so DP sums and ties are exact.

    Unless every node's bandwidth is known, all nodes count as equally fast (cost = bytes).
    """
    known = all(node.bandwidth_gbps for node in nodes)
    bandwidth = [node.bandwidth_gbps if known else 1.0 for node in nodes]
    return lambda i, a, b: round(info.stage_bytes(a, b) * 1000 / bandwidth[i])


def _memory_split(
    num_layers: int, fits: Callable[[int, int, int], bool], targets: Sequence[int]
) -> list[int] | None:
    """The fitting split with the fewest layer moves away from the proportional `targets`."""
    found = _split(
        num_layers, len(targets) - 1, fits,
        lambda i, a, b: abs(b - targets[i + 1]), lambda x, y: x + y, 0,
    )
    return None if found is None else found[1]


def _balanced_split(
    info: ModelInfo, nodes: Sequence[NodeCapacity], fits: Callable[[int, int, int], bool],
    targets: Sequence[int],
) -> list[int] | None:
    """Smallest slowest stage; among those the least total time, then the fewest moves."""
    stage_ps = _stage_picoseconds(info, nodes)
    n, k = info.num_layers, len(nodes)
    bottleneck = _split(n, k, fits, stage_ps, max, 0)
    if bottleneck is None:
        return None
    limit = bottleneck[0]
    found = _split(
        n, k,
        lambda i, a, b: stage_ps(i, a, b) <= limit and fits(i, a, b),
        lambda i, a, b: (stage_ps(i, a, b), abs(b - targets[i + 1])),
        _add, (0, 0),
    )
    assert found is not None  # the bottleneck split itself qualifies
    return found[1]
