"""Hardware detection: real probe on this machine, and the Metal/CUDA paths through a fake MLX."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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
