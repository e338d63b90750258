"""Local workers (`--local-workers`, `--demo`) spread over this machine's cores."""

from __future__ import annotations

import os

import pytest
from conftest import GiB

from coordinator.local import LocalWorkers, core_sets


def test_core_sets_split_the_cores_into_contiguous_shares():
    assert core_sets([0, 1, 2, 3], 2) == [{0, 1}, {2, 3}]
    assert core_sets([0, 1, 2, 3, 4], 2) == [{0, 1, 2}, {3, 4}]
    assert core_sets([2, 5, 7], 3) == [{2}, {5}, {7}]
    assert core_sets([0, 1], 4) == [{0}, {1}, {0}, {1}]  # more workers than cores: in turn
    assert core_sets([3], 2) == [{3}, {3}]


def affinities(env: dict[str, str]) -> list[set[int]]:
    local = LocalWorkers(2, memory=[1 * GiB] * 2)
    local.env.update(env)
    local.start()
    try:
        return [os.sched_getaffinity(p.pid) for p in local.procs]
    finally:
        local.stop()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two cores")
def test_two_local_workers_keep_to_their_own_cores_unless_told_not_to():
    mine = os.sched_getaffinity(0)
    spread = affinities({})
    assert spread == core_sets(sorted(mine), 2)
    assert not spread[0] & spread[1] and spread[0] | spread[1] == mine
    assert affinities({"SHARDLINE_SPREAD": "0"}) == [mine, mine]
