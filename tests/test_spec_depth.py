"""How many proposals a round carries: the odds of a confirmation against what a check costs."""

from __future__ import annotations

import asyncio
import random

import pytest
from test_speculation import Always

from coordinator.serving.spec_depth import RoundCosts, best, expected_tokens
from coordinator.serving.speculation import Speculator, drafts_ahead


def costs(seconds_of, sizes=(1, 2, 3, 4), rounds=5) -> RoundCosts:
    c = RoundCosts()
    for k in sizes:
        for _ in range(rounds):
            c.add(k, seconds_of(k))
    return c


def test_expected_tokens_of_a_round():
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.0, 4) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_no_answer_until_two_sizes_are_timed_a_few_times():
    c = RoundCosts()
    for _ in range(10):
        c.add(4, 0.010)
    assert best(0.8, c, 4) is None
    c.add(1, 0.005)
    c.add(1, 0.005)
    assert best(0.8, c, 4) is None  # two rounds of one proposal are not enough yet
    c.add(1, 0.005)
    assert best(0.8, c, 4) is not None


def test_a_flat_cost_takes_every_proposal_and_a_steep_one_few():
    flat = costs(lambda k: 0.010)  # CUDA: a chunk of 2 to 8 positions costs one price
    assert best(0.6, flat, 7) == 7
    steep = costs(lambda k: 0.010 + 0.003 * k)  # each checked position: 30% of a step
    assert [best(p, steep, 7) for p in (0.5, 0.7, 0.8, 0.9, 0.95)] == [1, 2, 3, 5, 7]


def test_a_size_never_timed_is_read_off_the_line_and_no_round_costs_less_than_a_plain_step():
    c = costs(lambda k: 0.010 + 0.002 * k, sizes=(2, 4))
    assert c.estimate(6)[6] == pytest.approx(0.022)  # extrapolated
    assert c.estimate(6)[1] == pytest.approx(0.014)  # not under the cheapest size timed
    for _ in range(3):
        c.add(0, 0.010)
    assert c.estimate(6)[1] == pytest.approx(0.012)  # not under a step without proposals
    tilted = costs(lambda k: 0.004 if k < 3 else 0.5, sizes=(1, 2, 3))
    assert min(tilted.estimate(3).values()) >= 0.004


def test_a_slow_first_round_of_a_size_does_not_hold_it_back():
    """A size's first round can pay a one-time cost (on a GPU, 1.5 s where the rest take
    10 ms): the size's time is its recent rounds' median, not a mean carrying that round."""
    c = costs(lambda k: 0.010, sizes=(1, 2, 3))
    c.add(7, 1.5)
    for _ in range(4):
        c.add(7, 0.010)
    assert c.seconds[7] == pytest.approx(0.010)
    assert best(0.9, c, 7) == 7
    for _ in range(9):  # a size that became dearer is followed within its last rounds
        c.add(7, 0.030)
    assert c.seconds[7] == pytest.approx(0.030)


def drive(seconds_of, odds: float, steps: int = 400, most: int = 7) -> list[int]:
    """One request's proposals per round over `steps` rounds; a round of k takes
    `seconds_of(k)`, each proposal is confirmed with `odds` (seeded)."""
    req = Speculator(Always(), most).request("a")
    rng = random.Random(0)

    async def run():
        sizes = []
        for _ in range(steps):
            drafts = await req.propose([0], running=1, room=10_000)
            confirmed = 0
            while confirmed < len(drafts) and rng.random() < odds:
                confirmed += 1
            req.record(len(drafts), confirmed, seconds_of(len(drafts)))
            sizes.append(len(drafts))
        return sizes

    return asyncio.run(run())


def test_a_request_keeps_every_proposal_where_a_check_costs_the_same_for_any_size():
    # the size after a miss used to be one more than the proposals confirmed; once the costs
    # are known, a miss no longer shrinks the round where a longer check costs nothing more
    sizes = drive(lambda k: 0.010, odds=0.7)
    late = sizes[100:]
    assert late.count(7) / len(late) > 0.9, late[:40]


def test_a_request_checks_few_proposals_where_each_costs_much_of_a_step():
    # each checked position costs 30% of a step: at 70% odds two proposals bring the most
    sizes = drive(lambda k: 0.010 + 0.003 * k, odds=0.7)
    late = [k for k in sizes[100:] if k]
    assert sum(late) / len(late) < 2.6 and sum(k >= 5 for k in late) < 0.05 * len(late), late


def test_a_request_drafts_ahead_only_while_its_speculator_says_so():
    class Counted(Always):
        def __init__(self) -> None:
            self.ahead_calls = 0

        def ahead(self, key, tokens, proposals, k):
            self.ahead_calls += 1

    proposer, allowed = Counted(), [True]
    req = Speculator(proposer, 4, drafts_ahead=lambda: allowed[0]).request("a")
    assert asyncio.run(req.propose([0], running=1, room=100)) == [1] * 4
    assert proposer.ahead_calls == 1
    allowed[0] = False
    assert asyncio.run(req.propose([0], running=1, room=100)) == [1] * 4
    assert proposer.ahead_calls == 1


def test_a_draft_on_a_gpu_that_a_stage_computes_on_does_not_draft_ahead():
    gpu, cpu = ("cuda:m:0", 1), ("cpu:m:0,1", 2)
    assert not drafts_ahead(gpu, ["cuda:m:0", "cuda:n:0"], {})
    assert drafts_ahead(gpu, ["cuda:m:1", "metal:n"], {})  # its GPU is its own
    assert drafts_ahead(cpu, ["cpu:m:0,1"], {})  # cores compute several steps at once
    assert not drafts_ahead(("cpu:m:0", 1), ["cpu:m:0"], {})
    assert drafts_ahead(gpu, ["cuda:m:0"], {"SHARDLINE_DRAFT_AHEAD": "1"})
    assert not drafts_ahead(cpu, [], {"SHARDLINE_DRAFT_AHEAD": "0"})
    assert not drafts_ahead(gpu, ["cuda:m:0"], {"SHARDLINE_DRAFT_AHEAD": "yes"})
