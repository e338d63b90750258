"""Local workers (`--local-workers`, `--demo`) spread over this machine's cores or CUDA GPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import GiB

from coordinator.local import LocalWorkers, core_sets, cuda_gpus, memory_each, sharing_note


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


class CudaMLX:
    """Just enough of `mlx.core` on a machine with `gpus` CUDA GPUs."""

    metal = None
    gpu = "gpu"

    def __init__(self, gpus: int) -> None:
        self.cuda = type("cuda", (), {"is_available": staticmethod(lambda: True)})
        self.gpus = gpus

    def device_count(self, device: str) -> int:
        return self.gpus if device == self.gpu else 1


def test_cuda_gpus_are_those_cuda_visible_devices_names_or_all_of_them():
    assert cuda_gpus({}, CudaMLX(4)) == ["0", "1", "2", "3"]
    assert cuda_gpus({"CUDA_VISIBLE_DEVICES": "3, 1"}, CudaMLX(2)) == ["3", "1"]
    assert cuda_gpus({}) == []  # MLX computes on this machine's CPU


@pytest.mark.parametrize("gpus, count, share", [
    ([], 2, 2), (["0"], 2, 2), (["0", "1"], 2, 1), (["0", "1"], 3, 2), (["0", "1", "2"], 2, 1)])
def test_local_workers_share_a_devices_memory_with_the_workers_on_it(
        monkeypatch, gpus, count, share):
    import coordinator.local

    monkeypatch.setattr(coordinator.local, "cuda_gpus", lambda environ: gpus)
    assert memory_each(12 * GiB, count, {}) == 12 * GiB // share
    assert memory_each(12 * GiB, count, {"SHARDLINE_SPREAD": "0"}) == 12 * GiB // count


@pytest.mark.parametrize("gpus, count, on_gpu, warned", [
    ([], 2, True, True), (["0", "1"], 2, True, False), (["0", "1"], 3, True, True),
    ([], 1, True, False), ([], 4, False, False)])
def test_local_workers_sharing_a_gpu_are_warned_of(monkeypatch, gpus, count, on_gpu, warned):
    import coordinator.local

    monkeypatch.setattr(coordinator.local, "cuda_gpus", lambda environ: gpus)
    note = sharing_note(count, {}, on_gpu=on_gpu)
    assert (note is not None) == warned
    if warned:
        assert f"{count} local workers share" in note and "docs/linux-gpu.md" in note
    assert sharing_note(count, {}) is None  # MLX computes on this machine's CPU


def visible_devices(monkeypatch, env: dict[str, str]) -> list[str | None]:
    import coordinator.local

    monkeypatch.setattr(coordinator.local, "cuda_gpus", lambda environ: ["0", "1"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    local = LocalWorkers(3, memory=[1 * GiB] * 3)
    local.env.update(env)
    local.start()
    try:
        environs = [Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
                    for p in local.procs]
    finally:
        local.stop()
    key = b"CUDA_VISIBLE_DEVICES="
    return [next((v[len(key):].decode() for v in e if v.startswith(key)), None)
            for e in environs]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_local_workers_on_several_cuda_gpus_take_one_each_in_turn(monkeypatch):
    assert visible_devices(monkeypatch, {}) == ["0", "1", "0"]
    assert visible_devices(monkeypatch, {"SHARDLINE_SPREAD": "0"}) == [None] * 3
