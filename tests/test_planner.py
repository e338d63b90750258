"""Layer partitioning: memory proportions, capacity, refusals, the balanced DP vs brute force."""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import pytest

from coordinator import plan_cli
from coordinator.cluster.modelinfo import ModelError, ModelInfo
from coordinator.cluster.planner import (
    NodeCapacity,
    Plan,
    PlanError,
    kv_reservation,
    plan,
    proportional_boundaries,
)

GiB, MiB = 1 << 30, 1 << 20


def model(
    layers: int = 12, layer: int = MiB, *, sizes: tuple[int, ...] | None = None, embed: int = 0,
    head: int = 0, norm: int = 0, tied: bool = False, kv: int = 0, max_context: int = 4096,
    model_type: str = "llama",
) -> ModelInfo:
    sizes = sizes or (layer,) * layers
    return ModelInfo(
        path=Path("/models/toy"), model_id="toy", model_type=model_type, num_layers=len(sizes),
        hidden_size=64, layer_bytes=tuple(sizes), embed_bytes=embed,
        head_bytes=embed if tied else head, norm_bytes=norm, tied=tied,
        kv_bytes_per_token=(kv,) * len(sizes), max_context=max_context,
    )


def nodes(*memories: float, bandwidths: tuple[float, ...] | None = None) -> list[NodeCapacity]:
    bandwidths = bandwidths or (None,) * len(memories)
    return [
        NodeCapacity("abcdefgh"[i], int(m * GiB), bw)
        for i, (m, bw) in enumerate(zip(memories, bandwidths, strict=True))
    ]


def counts(p: Plan) -> tuple[int, ...]:
    return tuple(s.layer_end - s.layer_start for s in p.stages)


def all_splits(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        yield (0, *cuts, n)


def need(info: ModelInfo, a: int, b: int, context: int = 4096, seqs: int = 4) -> int:
    return info.stage_bytes(a, b) + kv_reservation(info, a, b, context, seqs)


def fits(info: ModelInfo, ns: list[NodeCapacity], bounds) -> bool:
    return all(
        need(info, a, b) <= node.memory_bytes
        for node, (a, b) in zip(ns, itertools.pairwise(bounds), strict=True)
    )


def assert_valid(p: Plan, info: ModelInfo, ns: list[NodeCapacity]) -> None:
    assert [s.node for s in p.stages] == ns
    assert p.stages[0].layer_start == 0 and p.stages[-1].layer_end == info.num_layers
    for s, t in itertools.pairwise(p.stages):
        assert s.layer_end == t.layer_start and s.layer_start < s.layer_end
    for s in p.stages:
        assert s.total_bytes <= s.node.memory_bytes
        assert s.weight_bytes == info.stage_bytes(s.layer_start, s.layer_end)


def test_layers_follow_memory_proportions():
    info, ns = model(12), nodes(1, 2, 3)
    p = plan(info, ns)
    assert counts(p) == (2, 4, 6)
    assert [s.node.name for s in p.stages] == ["a", "b", "c"]
    assert_valid(p, info, ns)


def test_proportional_rounding_uses_largest_remainder_then_node_order():
    assert proportional_boundaries(12, [1, 2, 3]) == [0, 2, 6, 12]
    assert proportional_boundaries(10, [16, 24, 64]) == [0, 2, 4, 10]  # 1.54, 2.31, 6.15
    assert proportional_boundaries(5, [1, 1]) == [0, 3, 5]
    assert proportional_boundaries(4, [1, 1, 1]) == [0, 2, 3, 4]


def test_tiny_node_still_gets_one_layer():
    info, ns = model(10), nodes(0.01, 100, 100)
    p = plan(info, ns)
    assert counts(p) == (1, 5, 4)
    assert proportional_boundaries(5, [1, 100, 100]) == [0, 1, 3, 5]


def test_overflowing_first_node_hands_a_layer_to_its_neighbour():
    # 3 + 3 + 3 by memory, but the 2.5 GiB embedding makes stage a need 5.5 GiB of 5.
    info, ns = model(9, GiB, embed=int(2.5 * GiB)), nodes(5, 5, 5)
    p = plan(info, ns)
    assert counts(p) == (2, 4, 3)
    assert_valid(p, info, ns)


def test_overflowing_last_node_hands_a_layer_backwards():
    info, ns = model(9, GiB, head=int(2.5 * GiB)), nodes(5, 5, 5)
    p = plan(info, ns)
    assert counts(p) == (3, 4, 2)
    assert_valid(p, info, ns)


def test_overflow_passes_through_a_full_neighbour_to_one_with_slack():
    # Target 2, 1, 6: a needs 5 GiB of 4, b holds exactly one layer, so c takes the extra.
    info, ns = model(9, GiB, embed=3 * GiB), nodes(4, 1, 10)
    assert proportional_boundaries(9, [n.memory_bytes for n in ns]) == [0, 2, 3, 9]
    p = plan(info, ns)
    assert counts(p) == (1, 1, 7)
    assert_valid(p, info, ns)


def moves(bounds, target) -> int:
    return sum(abs(x - t) for x, t in zip(bounds, target, strict=True))


def test_memory_partition_makes_the_fewest_moves_that_fit_random_cases():
    rng = random.Random(7)
    outcomes = {"refused": 0, "proportional": 0, "moved": 0}
    for _ in range(200):
        n, k = rng.randint(2, 9), rng.randint(1, 4)
        if k > n:
            continue
        info = model(sizes=tuple(rng.randint(1, 8) * GiB for _ in range(n)),
                     embed=rng.randint(0, 12) * GiB, head=rng.randint(0, 12) * GiB)
        shares = [rng.randint(1, 5) for _ in range(k)]
        ns = nodes(*(1.3 * info.weight_bytes / GiB * s / sum(shares) for s in shares))
        target = proportional_boundaries(n, [x.memory_bytes for x in ns])
        feasible = [b for b in all_splits(n, k) if fits(info, ns, b)]
        if not feasible:
            with pytest.raises(PlanError):
                plan(info, ns)
            outcomes["refused"] += 1
            continue
        p = plan(info, ns)
        assert_valid(p, info, ns)
        bounds = [0] + [s.layer_end for s in p.stages]
        assert moves(bounds, target) == min(moves(b, target) for b in feasible)
        outcomes["moved" if moves(bounds, target) else "proportional"] += 1
    assert min(outcomes.values()) >= 15, outcomes


def test_model_too_big_for_all_workers_is_refused_with_the_numbers():
    info = model(12, GiB, kv=1024)  # KV: 12 layers x 1 KiB x 4096 x 4 = 192 MiB
    with pytest.raises(PlanError) as err:
        plan(info, nodes(4, 4, 4))
    message = str(err.value)
    assert message.startswith(
        "model needs 12.19 GiB (weights 12.00 GiB + KV 192.00 MiB for 4 x 4096 tokens) "
        "but the workers have 12.00 GiB: a 4.00 GiB, b 4.00 GiB, c 4.00 GiB"
    )


def test_kv_reservation_alone_can_refuse_a_model():
    info = model(4, GiB, kv=64 * 1024)  # KV: 4 x 64 KiB x 4096 x 4 = 4 GiB
    plan(info, nodes(5), max_sequences=1)
    with pytest.raises(PlanError, match="KV 4.00 GiB"):
        plan(info, nodes(5))


def test_layer_larger_than_any_node_is_refused_with_per_worker_needs():
    info = model(sizes=(GiB, 6 * GiB, GiB))
    with pytest.raises(PlanError) as err:
        plan(info, nodes(5, 5))
    message = str(err.value)
    assert "largest layer 6.00 GiB" in message
    assert "a needs 7.00 GiB of 5.00 GiB" in message and "b needs 1.00 GiB of 5.00 GiB" in message


def test_more_workers_than_layers_is_refused():
    with pytest.raises(PlanError, match="3 workers but the model has only 2 layers"):
        plan(model(2), nodes(8, 8, 8))
    with pytest.raises(PlanError, match="no workers"):
        plan(model(2), [])


def test_same_input_gives_the_same_plan():
    info = model(sizes=tuple((i % 3 + 1) * MiB for i in range(30)), embed=5 * MiB, kv=10)
    ns = nodes(0.05, 0.07, 0.05, 0.09, bandwidths=(100, 200, 100, 400))
    for partition in ("memory", "balanced"):
        first = plan(info, ns, partition=partition)
        again = [plan(info, list(ns), partition=partition) for _ in range(3)]
        assert all(p == first for p in again)
        assert all(p.describe() == first.describe() for p in again)


def brute_force_balanced(info, ns):
    def secs(node, a, b):
        return info.stage_bytes(a, b) / ((node.bandwidth_gbps or 1.0) * 1e9)

    best = None
    for bounds in all_splits(info.num_layers, len(ns)):
        if fits(info, ns, bounds):
            pairs = zip(ns, itertools.pairwise(bounds), strict=True)
            times = [secs(node, a, b) for node, (a, b) in pairs]
            key = (max(times), sum(times))
            best = key if best is None or key < best else best
    return best


def test_balanced_minimises_the_slowest_stage_like_brute_force():
    rng = random.Random(11)
    checked = 0
    for _ in range(200):
        n, k = rng.randint(2, 10), rng.randint(1, 4)
        if k > n:
            continue
        info = model(sizes=tuple(rng.randint(1, 50) * 10 * MiB for _ in range(n)),
                     embed=rng.randint(0, 300) * MiB, head=rng.randint(0, 300) * MiB)
        bws = tuple(rng.choice([68, 100, 120, 273, 400, 546, 800]) for _ in range(k))
        ns = nodes(*(rng.uniform(0.3, 3) for _ in range(k)), bandwidths=bws)
        best = brute_force_balanced(info, ns)
        if best is None:
            with pytest.raises(PlanError):
                plan(info, ns, partition="balanced")
            continue
        p = plan(info, ns, partition="balanced")
        assert_valid(p, info, ns)
        times = [s.seconds_per_token for s in p.stages]
        assert max(times) == pytest.approx(best[0], rel=1e-9)
        assert sum(times) == pytest.approx(best[1], rel=1e-9)
        checked += 1
    assert checked > 100


def test_balanced_gives_the_faster_node_more_layers():
    info, ns = model(8, GiB), nodes(16, 16, bandwidths=(100, 300))
    assert counts(plan(info, ns)) == (4, 4)
    assert counts(plan(info, ns, partition="balanced")) == (2, 6)


def test_balanced_without_bandwidths_evens_out_stage_bytes():
    # The 3 GiB embedding counts like three layers on the first stage.
    info, ns = model(9, GiB, embed=3 * GiB), nodes(16, 16, 16)
    p = plan(info, ns, partition="balanced")
    assert counts(p) == (1, 4, 4)
    assert max(s.weight_bytes for s in p.stages) == 4 * GiB
    assert all(s.seconds_per_token is None for s in p.stages)


def test_balanced_respects_memory_over_speed():
    info, ns = model(8, GiB), nodes(16, 3.5, bandwidths=(100, 800))
    assert counts(plan(info, ns, partition="balanced")) == (5, 3)


def test_context_defaults_to_the_model_maximum_capped_at_4096():
    assert plan(model(4, kv=8, max_context=2048), nodes(1)).context == 2048
    assert plan(model(4, kv=8, max_context=131072), nodes(1)).context == 4096
    p = plan(model(4, kv=8), nodes(1, 1), context=100, max_sequences=3)
    assert [s.kv_bytes for s in p.stages] == [2 * 8 * 100 * 3, 2 * 8 * 100 * 3]
    assert kv_reservation(model(4, kv=8), 1, 4, 100, 3) == 3 * 8 * 100 * 3


def test_tied_embedding_is_loaded_again_by_the_last_stage():
    info = model(4, GiB, embed=GiB, tied=True)
    p = plan(info, nodes(8, 8))
    assert [s.weight_bytes for s in p.stages] == [3 * GiB, 3 * GiB]
    assert plan(info, nodes(8)).stages[0].weight_bytes == 5 * GiB
    with pytest.raises(PlanError, match="weights 6.00 GiB"):
        plan(info, nodes(2.9, 2.9))


def test_reserve_fraction_holds_memory_back():
    info = model(4, GiB)
    plan(info, nodes(2, 2))
    with pytest.raises(PlanError, match="the workers have 3.60 GiB"):
        plan(info, nodes(2, 2), reserve_fraction=0.1)


def test_describe_lists_every_stage_and_the_speed_bound():
    info = model(12, GiB, embed=GiB, head=GiB)
    p = plan(info, nodes(16, 32, bandwidths=(100, 400)))
    text = p.describe()
    for expected in ("a", "b", "[0, 4)", "[4, 12)", "5.00 GiB", "9.00 GiB", "16.00 GiB"):
        assert expected in text
    total = sum(s.seconds_per_token for s in p.stages)
    assert total == pytest.approx(5 * GiB / 100e9 + 9 * GiB / 400e9)
    assert f"<= {1 / total:.1f} tokens/s" in text
    assert "tokens/s" not in plan(info, nodes(16, 32)).describe()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown partition"):
        plan(model(4), nodes(1), partition="fastest")
    with pytest.raises(ValueError):
        plan(model(4), nodes(1), context=0)


def run_cli(monkeypatch, info, *argv):
    monkeypatch.setattr(plan_cli, "resolve_model", lambda spec: Path(spec))
    monkeypatch.setattr(plan_cli, "read_model_info", lambda path, model_id=None: info)
    parser = argparse.ArgumentParser()
    plan_cli.add_plan_parser(parser.add_subparsers())
    return plan_cli.run_plan(parser.parse_args(["plan", "--model", "toy", *argv]))


def test_plan_command_prints_the_table(monkeypatch, capsys):
    code = run_cli(monkeypatch, model(12, GiB), "--memory", "16GiB,32GiB",
                   "--bandwidth", "100,400", "--partition", "balanced")
    out = capsys.readouterr().out
    assert code == 0
    assert "partition balanced" in out and "w0" in out and "w1" in out and "tokens/s" in out


@pytest.mark.parametrize(
    "info, argv, message",
    [
        (model(12), ["--memory", "1GiB,2GiB", "--bandwidth", "100"], "2 workers but --bandwidth"),
        (model(12), ["--memory", "1GiB,lots"], "not a size"),
        (model(12), ["--memory", "1GiB", "--bandwidth", "fast"], "not a bandwidth"),
        (model(12, GiB), ["--memory", "1GiB,2GiB"], "model needs 12.00 GiB"),
        (model(12, model_type="mamba"), ["--memory", "64GiB"], "'mamba' is not supported"),
    ],
)
def test_plan_command_errors_are_one_line(monkeypatch, capsys, info, argv, message):
    assert run_cli(monkeypatch, info, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_plan_command_reports_model_errors(monkeypatch, capsys):
    def missing(spec):
        raise ModelError(f"no model directory at {spec}")

    parser = argparse.ArgumentParser()
    plan_cli.add_plan_parser(parser.add_subparsers())
    monkeypatch.setattr(plan_cli, "resolve_model", missing)
    args = parser.parse_args(["plan", "--model", "./nope", "--memory", "8GiB"])
    assert plan_cli.run_plan(args) == 2
    assert capsys.readouterr().err == "error: no model directory at ./nope\n"


def test_named_workers_on_the_command_line():
    ns = plan_cli.parse_nodes("mini=16GiB, studio=64GiB", "120,546")
    assert ns == [NodeCapacity("mini", 16 * GiB, 120.0), NodeCapacity("studio", 64 * GiB, 546.0)]


def test_the_prefix_cache_is_in_the_kv_reservation():
    info = model(4, MiB, kv=8)
    p = plan(info, nodes(1, 1), context=100, max_sequences=3, prefix_cache_tokens=50)
    assert [s.kv_bytes for s in p.stages] == [2 * 8 * (100 * 3 + 50)] * 2
    assert kv_reservation(info, 1, 4, 100, 3, 50) == 3 * 8 * (100 * 3 + 50)
    assert p.prefix_cache_tokens == 50
    assert "KV reserved for 3 x 100 tokens + 50 prefix-cache tokens" in p.describe()
    assert plan(info, nodes(1, 1), prefix_cache_tokens=50) == plan(
        info, list(nodes(1, 1)), prefix_cache_tokens=50)
    # 4 MiB of weights + 4 x 4096 x 4 x 64 B (4 MiB) of KV fit 8.5 MiB; the 4096 cached tokens
    # (1 MiB more) do not, and the refusal says so with the numbers
    big = model(4, MiB, kv=64)
    plan(big, nodes(8.5 / 1024), prefix_cache_tokens=0)
    with pytest.raises(PlanError, match=r"model needs 9.00 MiB \(weights 4.00 MiB \+ KV 5.00 "
                       r"MiB for 4 x 4096 tokens \+ 4096 prefix-cache tokens\) but the workers "
                       r"have 8.50 MiB"):
        plan(big, nodes(8.5 / 1024), prefix_cache_tokens=4096)
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        plan(info, nodes(1), prefix_cache_tokens=-1)


def test_plan_command_reserves_the_prefix_cache_like_serve(monkeypatch, capsys):
    info = model(4, MiB, kv=64)
    assert run_cli(monkeypatch, info, "--memory", "1GiB") == 0
    assert "4 x 4096 tokens + 4096 prefix-cache tokens" in capsys.readouterr().out
    assert run_cli(monkeypatch, info, "--memory", "1GiB", "--prefix-cache-tokens", "0") == 0
    out = capsys.readouterr().out
    assert "KV reserved for 4 x 4096 tokens\n" in out
    assert "prefix-cache" not in out
    assert run_cli(monkeypatch, info, "--memory", "8.5MiB") == 2
    assert "+ 4096 prefix-cache tokens) but the workers have 8.50 MiB" in capsys.readouterr().err
