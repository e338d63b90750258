"""What this machine can do: backend, chip, usable memory and bandwidth (all platform code here).

Every probe is best-effort: a missing key, file or command falls back to the next source and
never raises. Usable memory is what a worker may plan to fill with weights and KV cache:
Metal's recommended working set on Apple silicon, free device memory on CUDA, and
MemAvailable (capped by a cgroup limit) on a CPU-only host. Bandwidth comes from the chip
tables below; a chip they do not name is measured once (a timed copy through MLX) and the
result kept in the cache dir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("shardline.worker")

# Apple silicon unified-memory bandwidth, GB/s (Apple's published figures). The M4 Max with
# the 14-core CPU has 410; 546 is the full chip. Unknown chips get None (planner falls back).
CHIP_BANDWIDTH_GBPS: dict[str, float] = {
    "M1": 68.0,
    "M1 Pro": 200.0,
    "M1 Max": 400.0,
    "M1 Ultra": 800.0,
    "M2": 100.0,
    "M2 Pro": 200.0,
    "M2 Max": 400.0,
    "M2 Ultra": 800.0,
    "M3": 100.0,
    "M3 Pro": 150.0,
    "M3 Max": 400.0,
    "M3 Ultra": 819.0,
    "M4": 120.0,
    "M4 Pro": 273.0,
    "M4 Max": 546.0,
}

# NVIDIA GPUs by what CUDA calls them (first match wins), GB/s (NVIDIA's published figures).
NVIDIA_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("A10", 600.0),
)

_APPLE_CHIP = re.compile(r"\bM(\d+)(?:\s+(Pro|Max|Ultra))?\b", re.IGNORECASE)


@dataclass(frozen=True)
class Hardware:
    """One machine's compute: backend ("metal" | "cuda" | "cpu"), chip name and memory."""

    backend: str
    chip: str
    memory_bytes: int  # usable for weights + KV cache
    bandwidth_gbps: float | None
    total_memory_bytes: int
    device: str = ""  # the compute device: workers that share one name it alike (`device_of`)
    lanes: int = 1  # steps that device computes at once


def chip_bandwidth(chip: str) -> float | None:
    """Memory bandwidth in GB/s of an Apple chip named like "Apple M2 Max" or an NVIDIA GPU
    named like "NVIDIA H100 80GB HBM3"; None if unknown."""
    if not chip:
        return None
    if "nvidia" in chip.lower():
        return next((bw for name, bw in NVIDIA_BANDWIDTH_GBPS if name.lower() in chip.lower()),
                    None)
    match = _APPLE_CHIP.search(chip)
    if match is None:
        return None
    tier = match.group(2)
    name = f"M{match.group(1)}" + (f" {tier.capitalize()}" if tier else "")
    return CHIP_BANDWIDTH_GBPS.get(name)


# The bandwidth probe: a timed copy of this many bytes (read once, written once) through MLX on
# its default device, best of a few runs after a warm-up. 64 MiB takes about 0.25 s on one
# CPU core, far less on a GPU; chips the tables name are never measured.
PROBE_BYTES = 64 << 20
PROBE_REPEATS = 3
BANDWIDTH_FILE = "bandwidth.json"  # in the cache dir: {"backend:chip": GB/s}


def measure_bandwidth(nbytes: int = PROBE_BYTES, repeats: int = PROBE_REPEATS,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Memory bandwidth in GB/s seen by MLX: `nbytes` read and written by one elementwise
    copy, the fastest of `repeats` timed runs (after one that warms the allocator)."""
    import mlx.core as mx

    src = mx.zeros((max(nbytes // 4, 1),), dtype=mx.float32)
    mx.eval(src)
    best = math.inf
    for i in range(repeats + 1):
        t0 = clock()
        dst = src + 1
        mx.eval(dst)
        elapsed = clock() - t0
        del dst
        if i:
            best = min(best, elapsed)
    nbytes = src.nbytes
    del src
    for name in ("clear_cache", "reset_peak_memory"):  # leave no trace in the memory metrics
        if callable(release := getattr(mx, name, None)):
            release()
    if not best > 0:
        raise RuntimeError(f"the bandwidth probe took {best} s")
    return 2 * nbytes / best / 1e9


def cached_bandwidth(backend: str, chip: str, cache_dir: Path,
                     measure: Callable[[], float] | None = None) -> float | None:
    """The measured bandwidth (GB/s) of this backend and chip: read from the cache dir, or
    measured once (`measure`, default `measure_bandwidth`) and stored there; None when it
    cannot be measured."""
    path = Path(cache_dir) / BANDWIDTH_FILE
    key = f"{backend}:{chip}"
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    value = known.get(key)
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    try:
        value = round(float((measure or measure_bandwidth)()), 1)
    except Exception as e:  # noqa: BLE001 - a worker without a bandwidth still serves
        log.warning("could not measure memory bandwidth: %s", e)
        return None
    if not (math.isfinite(value) and value > 0):
        return None
    known[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not keep the measured bandwidth in %s: %s", path, e)
    return value


def wire_memory(weight_bytes: int, mx: Any = None) -> int:
    """On Metal, let MLX keep up to the recommended working set wired, as mlx-lm's `generate`
    does, so macOS does not page a shard's weights out between tokens. Returns the limit set
    in bytes (0 on other backends, where memory is not paged that way); warns when the shard
    alone is over it (it would be paged while it runs)."""
    if mx is None:
        import mlx.core as mx

    metal = getattr(mx, "metal", None)
    if metal is None or not metal.is_available():
        return 0
    limit = _int_key(_device_info(mx), "max_recommended_working_set_size")
    if limit is None:
        return 0
    if weight_bytes > limit:
        log.warning("the shard's %d bytes of weights are over the recommended working set of "
                    "%d bytes: expect it to be slow (raise it with sysctl iogpu.wired_limit_mb)",
                    weight_bytes, limit)
    mx.set_wired_limit(limit)
    return limit


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_allocator() -> bool:
    """Keep glibc's heap from giving multi-MiB buffers back to the kernel after every use.

    Shard chunks and activations are MiB-sized Python bytes; by default glibc trims (or unmaps)
    such a buffer when it is freed and faults fresh zeroed pages in for the next, which cost
    the shard transfer a third of its time in the kernel. Linux with glibc only (a no-op
    elsewhere); returns whether it applied."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, 64 << 20), (_M_TRIM_THRESHOLD, 256 << 20),
            (_M_TOP_PAD, 16 << 20)))
    except (OSError, AttributeError):
        return False


def batch_scheduling(environ: Mapping[str, str] | None = None) -> bool:
    """Run this process's threads, and every thread started from now on, under Linux's
    SCHED_BATCH.

    A pipeline stage hands each token between threads: the event loop wakes the MLX thread,
    which wakes MLX's stream thread with every task it launches, and back. Under the default
    policy a woken thread pre-empts the one that woke it, so on a busy host each hand-off
    costs a task switch (7 to 16 a token on the MLX thread of a one-layer stage here,
    bench/OVERHEAD.md); SCHED_BATCH drops that wake-up pre-emption and keeps everything else
    (priorities, nice values, fair shares). Threads inherit it from the thread that starts
    them; those already running (a BLAS pool started at import) are set one by one. Linux only
    (a no-op elsewhere); SHARDLINE_SCHED_BATCH=0 keeps the default policy. Returns whether it
    applied."""
    environ = os.environ if environ is None else environ
    if environ.get("SHARDLINE_SCHED_BATCH", "1") == "0" or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return False
    try:
        running = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        running = []
    for tid in running:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # gone meanwhile
            pass
    return True


def detect(memory_override: int | None = None, cache_dir: Path | None = None) -> Hardware:
    """Probe this machine; `memory_override` (bytes) replaces the detected usable memory.

    With a `cache_dir`, a chip the bandwidth tables do not name gets a measured bandwidth
    (once per chip and cache dir: `cached_bandwidth`); without one it is None."""
    try:
        hw = _detect_mlx()
    except Exception:  # an MLX without the expected API must not stop a worker from starting
        hw = None
    if hw is None:
        hw = _detect_cpu()
    if hw.bandwidth_gbps is None and cache_dir is not None:
        hw = replace(hw, bandwidth_gbps=cached_bandwidth(hw.backend, hw.chip, cache_dir))
    if memory_override is not None:
        if memory_override <= 0:
            raise ValueError(f"memory_override must be positive, not {memory_override}")
        hw = replace(hw, memory_bytes=int(memory_override))
    device, lanes = device_of(hw.backend)
    return replace(hw, device=device, lanes=lanes)


def device_of(backend: str, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """This process's compute device, named alike by every worker that shares it, and how many
    steps it computes at once. A GPU computes one: workers on one Mac, or on one CUDA device
    (the first of `CUDA_VISIBLE_DEVICES`), take turns on it. A CPU computes as many as the
    cores this process may run on (its affinity), and workers pinned to the same cores share
    them."""
    environ = os.environ if environ is None else environ
    machine = _machine_id()
    if backend == "cpu":
        if hasattr(os, "sched_getaffinity"):
            cores = sorted(os.sched_getaffinity(0))
        else:
            cores = list(range(os.cpu_count() or 1))
        return f"cpu:{machine}:{','.join(map(str, cores))}", max(1, len(cores))
    if backend == "cuda":
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
        return f"cuda:{machine}:{visible}", 1
    return f"{backend}:{machine}", 1


def _machine_id() -> str:
    """A name of this machine that its processes all give and no other machine does: systemd's
    machine id where there is one, else a hardware address (`uuid.getnode`, unless it made one
    up: another in every process), else the host name and boot id (a container may have none)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        if text := _text_of(path):
            return text
    if not (node := uuid.getnode()) & 1 << 40:  # the multicast bit: a made-up address
        return f"{node:012x}"
    return f"{platform.node()}:{_text_of('/proc/sys/kernel/random/boot_id')}"


def _text_of(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _detect_mlx(mx: Any = None) -> Hardware | None:
    """Metal or CUDA through MLX (`mx` is injectable for tests); None when neither is there."""
    if mx is None:
        import mlx.core as mx

    metal = getattr(mx, "metal", None)
    if metal is not None and metal.is_available():
        return _detect_metal(mx)
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and hasattr(cuda, "is_available") and cuda.is_available():
        return _detect_cuda(mx)
    return None


# MLX 0.32's quantized matrix product on CUDA costs about M times one row's for 2 to 7 rows and
# 3 times from 8 rows up (bench/RESULTS-gpu.md, "Rows laid out as one matrix"); Metal and the
# CPU have no such step (a product costs what its rows do). worker/padding.py `rows_for`.
CUDA_ROW_FLOOR = 8
MAX_ROW_FLOOR = 64  # SHARDLINE_PAD_ROWS above this is taken as this (padding costs compute)


def row_floor(mx: Any = None) -> int:
    """Rows a product of fewer is padded to (from half of it: worker/padding.py `rows_for`),
    where it costs less than those fewer rows: 8 on CUDA, else 1 (never pad).
    SHARDLINE_PAD_ROWS overrides it (`mx` is injectable for tests)."""
    env = os.environ.get("SHARDLINE_PAD_ROWS", "").strip()
    if env:
        try:
            rows = int(env)
        except ValueError:
            log.warning("SHARDLINE_PAD_ROWS=%r is not a number; ignored", env)
        else:
            if rows > MAX_ROW_FLOOR:
                log.warning("SHARDLINE_PAD_ROWS=%d is more than %d; %d it is", rows,
                            MAX_ROW_FLOOR, MAX_ROW_FLOOR)
            return min(max(1, rows), MAX_ROW_FLOOR)
    return CUDA_ROW_FLOOR if accelerator(mx) == "cuda" else 1


def accelerator(mx: Any = None) -> str | None:
    """"metal" or "cuda" where MLX computes on that GPU, else None (`mx` is injectable)."""
    try:
        if mx is None:
            import mlx.core as mx
        metal, cuda = getattr(mx, "metal", None), getattr(mx, "cuda", None)
        if metal is not None and metal.is_available():
            return "metal"
        if cuda is not None and hasattr(cuda, "is_available") and cuda.is_available():
            return "cuda"
    except Exception:  # noqa: BLE001 - an MLX without the probe: the CPU
        pass
    return None


def _device_info(mx: Any) -> dict[str, Any]:
    # mx.device_info is the current name; mx.metal.device_info the old one (Metal only).
    for probe in (lambda: mx.device_info(mx.gpu), lambda: mx.metal.device_info()):
        try:
            info = probe()
        except Exception:
            continue
        if isinstance(info, dict):
            return info
    return {}


def _int_key(info: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = info.get(key)
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return None


def _detect_metal(mx: Any) -> Hardware:
    info = _device_info(mx)
    total = _int_key(info, "memory_size", "total_memory") or _sysctl_int("hw.memsize")
    total = total or _system_memory()[0]
    usable = _int_key(info, "max_recommended_working_set_size") or int(total * 0.75)
    chip = str(info.get("device_name") or "") or _sysctl_str("machdep.cpu.brand_string")
    chip = chip or platform.processor() or "Apple silicon"
    return Hardware("metal", chip, min(usable, total), chip_bandwidth(chip), total)


def _detect_cuda(mx: Any) -> Hardware:
    info = _device_info(mx)
    total = _int_key(info, "total_memory", "memory_size")
    free = _int_key(info, "free_memory")
    if total is None:
        total = _system_memory()[0]
    usable = free if free is not None else total
    chip = str(info.get("device_name") or "") or "NVIDIA GPU"
    return Hardware("cuda", chip, min(usable, total), chip_bandwidth(chip), total)


def _detect_cpu() -> Hardware:
    total, available = _system_memory()
    chip = _cpu_model() or platform.processor() or platform.machine() or "cpu"
    return Hardware("cpu", chip, min(available, total), chip_bandwidth(chip), total)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes; empty where there is none."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            unit = 1024 if len(fields) > 1 and fields[1].lower() == "kb" else 1
            out[name.strip()] = int(fields[0]) * unit
    return out


def _cgroup_available() -> int | None:
    """Bytes this process's cgroup (v2 or v1) may still use, if it is limited.

    Like `docker stats`: usage minus inactive page cache, which the kernel reclaims first.
    """
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        root = Path("/sys/fs/cgroup")
        try:
            raw = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if not raw.isdigit() or int(raw) >= 1 << 60:  # "max", or v1's "no limit"
            return None
        try:
            used = int((root / usage_file).read_text().strip())
            for line in (root / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key and value.strip().isdigit():
                    used -= int(value)
        except (OSError, ValueError):
            used = 0
        return max(int(raw) - max(used, 0), 0)
    return None


def _system_memory() -> tuple[int, int]:
    """(total, available) system RAM in bytes, from the best source this OS has."""
    info = _meminfo()
    total = info.get("MemTotal") or _sysconf("SC_PHYS_PAGES") or _sysctl_int("hw.memsize") or 0
    available = info.get("MemAvailable") or _sysconf("SC_AVPHYS_PAGES") or total
    if sys.platform.startswith("linux") and (limit := _cgroup_available()) is not None:
        available = min(available, limit)
    total = total or available or 1
    return total, available or total


def _sysconf(name: str) -> int | None:
    try:
        pages = os.sysconf(name)
        page = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page if pages > 0 and page > 0 else None


def _sysctl_str(name: str) -> str:
    if sys.platform != "darwin":
        return ""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _sysctl_int(name: str) -> int | None:
    value = _sysctl_str(name)
    return int(value) if value.isdigit() else None


def _cpu_model() -> str:
    if sys.platform == "darwin":
        return _sysctl_str("machdep.cpu.brand_string")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return ""
