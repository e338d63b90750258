"""Hardware detection (a real probe on this machine, the Metal/CUDA paths through a fake MLX),
and the host settings a worker applies at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
from conftest import ROOT, GiB

from worker import backend
from worker.backend import CHIP_BANDWIDTH_GBPS, Hardware, chip_bandwidth, detect


def test_detect_on_this_machine() -> None:
    hw = detect()
    assert isinstance(hw, Hardware)
    assert hw.backend in ("metal", "cuda", "cpu")
    assert hw.chip
    assert 0 < hw.memory_bytes <= hw.total_memory_bytes
    assert hw.bandwidth_gbps is None or hw.bandwidth_gbps > 0


def test_memory_override() -> None:
    hw = detect(memory_override=3 * 2**30)
    assert hw.memory_bytes == 3 * 2**30
    assert hw.total_memory_bytes == detect().total_memory_bytes
    with pytest.raises(ValueError):
        detect(memory_override=0)


@pytest.mark.parametrize(
    ("chip", "gbps"),
    [
        ("Apple M1", 68),
        ("Apple M2", 100),
        ("Apple M3", 100),
        ("Apple M4", 120),
        ("Apple M1 Pro", 200),
        ("Apple M2 Pro", 200),
        ("Apple M3 Pro", 150),
        ("Apple M4 Pro", 273),
        ("Apple M1 Max", 400),
        ("Apple M2 Max", 400),
        ("Apple M3 Max", 400),
        ("Apple M4 Max", 546),
        ("Apple M1 Ultra", 800),
        ("Apple M2 Ultra", 800),
        ("Apple M3 Ultra", 819),
        ("M2 max", 400),
        ("Apple M4 Pro (14-core)", 273),
        ("NVIDIA H100 80GB HBM3", 3350),  # what CUDA reported on the GPU machine
        ("NVIDIA H100 PCIe", 2000),
        ("NVIDIA H200", 4800),
        ("NVIDIA A100-SXM4-80GB", 2039),
        ("NVIDIA GeForce RTX 4090", 1008),
    ],
)
def test_chip_bandwidth_known(chip: str, gbps: float) -> None:
    assert chip_bandwidth(chip) == gbps


@pytest.mark.parametrize(
    "chip",
    ["", "AMD EPYC", "Intel(R) Xeon(R) CPU", "NVIDIA GeForce GT 710", "Apple M9", "Tesla M60"],
)
def test_chip_bandwidth_unknown(chip: str) -> None:
    assert chip_bandwidth(chip) is None


def test_table_covers_every_apple_chip() -> None:
    assert len(CHIP_BANDWIDTH_GBPS) == 15
    assert all(chip_bandwidth(f"Apple {name}") == v for name, v in CHIP_BANDWIDTH_GBPS.items())


def fake_mx(metal: bool, cuda: bool | None, info: dict) -> SimpleNamespace:
    mx = SimpleNamespace(gpu="gpu", device_info=lambda d=None: dict(info))
    mx.metal = SimpleNamespace(is_available=lambda: metal)
    if cuda is not None:
        mx.cuda = SimpleNamespace(is_available=lambda: cuda)
    return mx


def test_metal_path() -> None:
    info = {
        "device_name": "Apple M2 Max",
        "memory_size": 64 * 2**30,
        "max_recommended_working_set_size": 48 * 2**30,
    }
    hw = backend._detect_mlx(fake_mx(True, False, info))
    assert hw == Hardware("metal", "Apple M2 Max", 48 * 2**30, 400.0, 64 * 2**30)


def test_metal_path_with_missing_keys(monkeypatch) -> None:
    monkeypatch.setattr(backend, "_sysctl_str", lambda name: "Apple M1")
    monkeypatch.setattr(backend, "_sysctl_int", lambda name: 16 * 2**30)
    hw = backend._detect_mlx(fake_mx(True, None, {}))
    assert hw.backend == "metal" and hw.chip == "Apple M1" and hw.bandwidth_gbps == 68.0
    assert hw.total_memory_bytes == 16 * 2**30 and 0 < hw.memory_bytes < hw.total_memory_bytes


def test_cuda_path() -> None:
    info = {
        "device_name": "NVIDIA H100 80GB HBM3",
        "total_memory": 80 * 10**9,
        "free_memory": 79 * 10**9,
    }
    hw = backend._detect_mlx(fake_mx(False, True, info))
    assert hw == Hardware("cuda", "NVIDIA H100 80GB HBM3", 79 * 10**9, 3350.0, 80 * 10**9)


def test_cuda_path_with_missing_keys() -> None:
    hw = backend._detect_mlx(fake_mx(False, True, {}))
    assert hw.backend == "cuda" and hw.chip
    assert 0 < hw.memory_bytes <= hw.total_memory_bytes


def test_no_gpu_and_broken_mlx_fall_back_to_cpu(monkeypatch) -> None:
    assert backend._detect_mlx(fake_mx(False, None, {})) is None
    assert backend._detect_mlx(fake_mx(False, False, {})) is None

    def broken(mx=None):
        raise AttributeError("no metal here")

    monkeypatch.setattr(backend, "_detect_mlx", broken)
    hw = detect()
    assert hw.backend == "cpu" and hw.memory_bytes > 0


def test_meminfo_parsing(monkeypatch, tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\nHugePages: 0\n")
    real_path = backend.Path
    monkeypatch.setattr(
        backend, "Path", lambda p: meminfo if p == "/proc/meminfo" else real_path(p)
    )
    assert backend._meminfo()["MemTotal"] == 16000000 * 1024
    assert backend._meminfo()["MemAvailable"] == 8000000 * 1024


def test_bandwidth_probe_times_a_copy_with_the_clock_it_is_given() -> None:
    ticks = iter([0.0, 1.0, 10.0, 10.002, 20.0, 20.001, 30.0, 30.004])  # warm-up, then 3 runs
    gbps = backend.measure_bandwidth(nbytes=1 << 20, repeats=3, clock=lambda: next(ticks))
    assert gbps == pytest.approx(2 * (1 << 20) / 0.001 / 1e9)  # the fastest run, read + write


def test_measured_bandwidth_is_plausible_cheap_and_kept_in_the_cache_dir(tmp_path) -> None:
    import time

    t0 = time.perf_counter()
    gbps = backend.cached_bandwidth("cpu", "Some CPU", tmp_path)
    assert time.perf_counter() - t0 < 5  # well under a second on an idle core
    assert gbps is not None and 0.1 < gbps < 20000
    assert json.loads((tmp_path / backend.BANDWIDTH_FILE).read_text()) == {"cpu:Some CPU": gbps}

    def never() -> float:
        raise AssertionError("measured again")

    assert backend.cached_bandwidth("cpu", "Some CPU", tmp_path, measure=never) == gbps
    # another chip in the same cache dir is measured once too, beside the first
    calls = []
    assert backend.cached_bandwidth("cpu", "Other", tmp_path,
                                    measure=lambda: calls.append(1) or 42.04) == 42.0
    assert backend.cached_bandwidth("cpu", "Other", tmp_path, measure=never) == 42.0
    assert calls == [1] and len(json.loads((tmp_path / backend.BANDWIDTH_FILE).read_text())) == 2


def test_a_broken_cache_file_or_probe_does_not_stop_detection(tmp_path) -> None:
    (tmp_path / backend.BANDWIDTH_FILE).write_text("not json")
    assert backend.cached_bandwidth("cpu", "X", tmp_path, measure=lambda: 7.0) == 7.0

    def broken() -> float:
        raise RuntimeError("no MLX device")

    assert backend.cached_bandwidth("cpu", "Y", tmp_path, measure=broken) is None
    assert backend.cached_bandwidth("cpu", "Z", tmp_path, measure=lambda: 0.0) is None
    assert "cpu:Y" not in json.loads((tmp_path / backend.BANDWIDTH_FILE).read_text())


def test_detect_measures_only_chips_the_tables_do_not_name(monkeypatch, tmp_path) -> None:
    measured = []
    monkeypatch.setattr(backend, "measure_bandwidth", lambda: measured.append(1) or 12.5)
    monkeypatch.setattr(backend, "_detect_mlx", lambda mx=None: None)
    monkeypatch.setattr(backend, "_cpu_model", lambda: "Unlisted CPU 9000")
    assert detect().bandwidth_gbps is None and measured == []  # no cache dir: no probe
    assert detect(cache_dir=tmp_path).bandwidth_gbps == 12.5
    assert detect(cache_dir=tmp_path).bandwidth_gbps == 12.5 and measured == [1]
    known = Hardware("metal", "Apple M2 Max", 1 << 30, 400.0, 2 << 30)
    monkeypatch.setattr(backend, "_detect_mlx", lambda mx=None: known)
    got = detect(cache_dir=tmp_path)
    assert replace(got, device="", lanes=1) == known and measured == [1]


def test_metal_wires_the_recommended_working_set_and_other_backends_wire_nothing(caplog):
    wired = []
    metal = fake_mx(True, False, {"max_recommended_working_set_size": 48 << 30})
    metal.set_wired_limit = wired.append
    assert backend.wire_memory(10 << 30, metal) == 48 << 30
    assert wired == [48 << 30]
    with caplog.at_level("WARNING", logger="shardline.worker"):
        backend.wire_memory(50 << 30, metal)
    assert "over the recommended working set" in caplog.text
    for other in (fake_mx(False, True, {"max_recommended_working_set_size": 1 << 30}),
                  fake_mx(False, None, {})):
        other.set_wired_limit = wired.append
        assert backend.wire_memory(1 << 20, other) == 0
    assert wired == [48 << 30, 48 << 30]  # the big shard still wires what it may


def test_short_chunks_are_padded_to_eight_rows_on_cuda_only(monkeypatch) -> None:
    monkeypatch.delenv("SHARDLINE_PAD_ROWS", raising=False)
    assert backend.row_floor(fake_mx(False, True, {})) == backend.CUDA_ROW_FLOOR == 8
    assert backend.row_floor(fake_mx(True, None, {})) == 1
    assert backend.row_floor(fake_mx(False, None, {})) == 1
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "1")
    assert backend.row_floor(fake_mx(False, True, {})) == 1
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "6")
    assert backend.row_floor(fake_mx(False, None, {})) == 6
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "many")
    assert backend.row_floor(fake_mx(False, True, {})) == 8
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "100000")  # would pad every prompt chunk
    assert backend.row_floor(fake_mx(False, None, {})) == backend.MAX_ROW_FLOOR == 64
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "-3")
    assert backend.row_floor(fake_mx(False, True, {})) == 1


LINUX_ONLY = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


@LINUX_ONLY
def test_batch_scheduling_reaches_the_threads_started_after_it_and_can_be_turned_off() -> None:
    script = (
        "import os, threading\n"
        "from worker.backend import batch_scheduling\n"
        "applied = batch_scheduling()\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))\n"
        "t.start(); t.join()\n"
        "print(applied, seen[0] == os.SCHED_BATCH, os.sched_getscheduler(0) == os.SCHED_BATCH)\n"
    )
    off = {"SHARDLINE_SCHED_BATCH": "0"}
    for env, want in (({}, "True True True"), (off, "False False False")):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, **env}, check=True)
        assert out.stdout.split() == want.split(), (env, out.stdout, out.stderr)


@LINUX_ONLY
def test_every_thread_of_a_running_worker_is_batch_scheduled(tmp_path) -> None:
    # the hand-offs of a token between its threads must not pre-empt (bench/OVERHEAD.md)
    from coordinator.local import LocalWorkers

    local = LocalWorkers(1, memory=[1 * GiB], cache_dir=tmp_path)
    try:
        local.start()
        pid = local.procs[0].pid
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(threads) > 3  # the event loop, the MLX thread, gRPC's, the metrics server
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_BATCH}
    finally:
        local.stop()


def test_workers_that_share_a_device_name_it_alike_with_the_steps_it_computes_at_once(
        monkeypatch) -> None:
    monkeypatch.setattr(backend, "_machine_id", lambda: "m1")
    # a GPU computes one step at a time, whichever worker sends it
    assert backend.device_of("metal") == ("metal:m1", 1)
    assert backend.device_of("cuda", {}) == ("cuda:m1:0", 1)
    assert backend.device_of("cuda", {"CUDA_VISIBLE_DEVICES": "3,1"}) == ("cuda:m1:3", 1)
    # a CPU as many as the cores this process may use; the same cores, the same device
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 0})
        assert backend.device_of("cpu") == ("cpu:m1:0,1", 2)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert backend.device_of("cpu") == ("cpu:m1:0", 1)
    hw = detect()
    assert hw.device == backend.device_of(hw.backend)[0] and hw.lanes >= 1


def test_machine_id_is_the_same_each_time_and_never_empty() -> None:
    assert backend._machine_id() == backend._machine_id() != ""


def test_machine_id_never_made_up_per_process(monkeypatch) -> None:
    # no machine-id file (a container): a hardware address if there is one, else the host name
    # and boot id, never uuid's random stand-in (another in every process, so workers on one
    # GPU would not know they share it)
    monkeypatch.setattr(backend, "_text_of",
                        lambda path: "b00t" if path.endswith("boot_id") else "")
    monkeypatch.setattr(backend.uuid, "getnode", lambda: 0x0242AC110002)
    assert backend._machine_id() == "0242ac110002"
    monkeypatch.setattr(backend.uuid, "getnode", lambda: 0x0342AC110002 | 1 << 40)
    monkeypatch.setattr(backend.platform, "node", lambda: "box")
    assert backend._machine_id() == "box:b00t"
