"""Worker processes on this machine for `--local-workers N` and `--demo`, stopped on exit."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LocalWorkerError(RuntimeError):
    """A local worker did not start."""


def core_sets(available: Sequence[int], count: int) -> list[set[int]]:
    """The cores each of `count` workers on one machine keeps to: contiguous equal shares of
    `available`, or one core each, in turn, where there are more workers than cores.

    On MLX's CPU backend a worker's MLX thread hands every step to MLX's own compute thread and
    waits for it; kept on the same cores those hand-offs stay cheap, where the scheduler would
    otherwise move them across cores (on a virtual machine a wake-up across cores costs tens
    of microseconds: bench/OVERHEAD.md, "Local workers spread over the cores").

    >>> core_sets([0, 1, 2, 3, 4], 2)
    [{0, 1, 2}, {3, 4}]
    >>> core_sets([0, 1], 3)
    [{0}, {1}, {0}]
    """
    n = len(available)
    if count >= n:
        return [{available[i % n]} for i in range(count)]
    sizes = [n // count + (i < n % count) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [set(available[s:s + k]) for s, k in zip(starts, sizes, strict=True)]


def _on_cpu() -> bool:
    """MLX computes on this machine's CPU (no GPU for it): where spreading over the cores was
    measured to help (on an H100 shared by the workers it did not: bench/RESULTS-gpu.md)."""
    from worker.backend import accelerator

    return accelerator() is None


def spreading(environ: Mapping[str, str]) -> bool:
    """Several local workers go to their own cores or GPUs unless SHARDLINE_SPREAD=0."""
    return environ.get("SHARDLINE_SPREAD", "1").strip() != "0"


def cuda_gpus(environ: Mapping[str, str] | None = None, mx: Any = None) -> list[str]:
    """The CUDA GPUs local workers may use, named as CUDA_VISIBLE_DEVICES names them (this
    machine's all, 0 to N-1, where it is unset); none where MLX does not compute on CUDA
    (`mx` is injectable)."""
    from worker.backend import accelerator

    if accelerator(mx) != "cuda":
        return []
    if mx is None:
        import mlx.core as mx
    count = mx.device_count(mx.gpu)
    environ = os.environ if environ is None else environ
    named = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def local_gpus(count: int, environ: Mapping[str, str]) -> list[str]:
    """The CUDA GPUs `count` local workers go to, one each in turn: none (all on the one MLX
    picks) unless there are several workers and several GPUs and spreading is on."""
    gpus = cuda_gpus(environ) if count > 1 and spreading(environ) else []
    return gpus if len(gpus) > 1 else []


def memory_each(memory: int, count: int, environ: Mapping[str, str]) -> int:
    """Each of `count` local workers' share of a device's `memory`: the devices' workers
    share it (all of them, but for several CUDA GPUs, where they go one to each in turn)."""
    gpus = local_gpus(count, environ)
    return memory // (-(-count // len(gpus)) if gpus else count)


def sharing_note(count: int, environ: Mapping[str, str], on_gpu: bool | None = None
                 ) -> str | None:
    """A warning for `count` local workers that share a GPU (None for one worker, workers on
    the CPU, or one GPU each; `on_gpu` where MLX computes on a GPU, detected if None): each
    token passes through every worker in turn, so they decode one stream slower than one
    worker would (bench/RESULTS-gpu.md, "What a hop between two processes on one GPU costs")."""
    if on_gpu is None:
        on_gpu = not _on_cpu()
    if count < 2 or not on_gpu:
        return None
    gpus = max(1, len(local_gpus(count, environ)))
    if count <= gpus:
        return None
    return (f"{count} local workers share {'one GPU' if gpus == 1 else f'{gpus} GPUs'}: a "
            "token passes through each in turn (about 0.9 ms more a token per added worker "
            "on an H100), so one worker decodes faster wherever the model fits; where workers "
            "must share a GPU, see docs/linux-gpu.md (MPS)")


class LocalWorkers:
    """Start N `worker serve` processes on 127.0.0.1 with free ports; `stop()` ends them.

    >>> with LocalWorkers(2, memory=[1 << 30, 1 << 30]) as addresses:  # doctest: +SKIP
    ...     print(addresses)
    ['127.0.0.1:40123', '127.0.0.1:40125']
    """

    def __init__(self, count: int, *, memory: Sequence[int] | None = None,
                 cache_dir: Path | None = None, names: Sequence[str] | None = None,
                 extra_args: Sequence[str] = (), cpus: Sequence[int] | None = None,
                 secret: bytes | None = None, wrap: Sequence[str] = (),
                 fresh_cache: bool = False) -> None:
        if count < 1:
            raise ValueError("--local-workers must be at least 1")
        self.count = count
        self.memory = list(memory) if memory else None
        self.cache_dir = cache_dir
        self.names = list(names) if names else [f"local-{i}" for i in range(count)]
        self.extra_args = list(extra_args)
        # pin worker i to CPU cpus[i] (Linux only); without cpus, several workers computing on
        # the CPU are spread over its cores (`core_sets`), and on a machine with several CUDA
        # GPUs over those (`cuda_gpus`, a GPU each in turn), unless SHARDLINE_SPREAD=0 is in
        # their environment
        self.cpus = list(cpus) if cpus else None
        self.wrap = list(wrap)  # a command each worker runs under (a namespace, a sandbox)
        self.env = dict(os.environ)
        self.env.pop("SHARDLINE_SECRET", None)
        if secret:  # through the environment, never argv (visible in ps)
            self.env["SHARDLINE_SECRET"] = os.fsdecode(secret)
        self._tmp = tempfile.TemporaryDirectory(prefix="shardline-local-")
        # fresh_cache: the workers start with an empty shard cache (as on new machines), which
        # stop() deletes, so repeated clusters do not fill the disk with shipped shards
        self._fresh = fresh_cache
        if fresh_cache:
            self.cache_dir = Path(self._tmp.name) / "cache"
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def _command(self, i: int, ready: Path) -> list[str]:
        cmd = [sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1", "--port", "0",
               "--no-advertise", "--name", self.names[i], "--ready-file", str(ready)]
        if self.memory:
            cmd += ["--memory", str(self.memory[i])]
        if self.cache_dir:
            cmd += ["--cache-dir", str(self.cache_dir)]
        return self.wrap + cmd + self.extra_args

    def _cores(self) -> list[set[int]] | None:
        """The cores each worker keeps to, or None: nowhere pinned."""
        if not hasattr(os, "sched_setaffinity"):
            return None
        if self.cpus:
            return [{self.cpus[i % len(self.cpus)]} for i in range(self.count)]
        if self.count > 1 and spreading(self.env) and _on_cpu():
            return core_sets(sorted(os.sched_getaffinity(0)), self.count)
        return None

    def log_path(self, i: int) -> Path:
        return Path(self._tmp.name) / f"worker-{i}.log"

    def start(self, timeout: float = 60.0) -> list[str]:
        readies = [Path(self._tmp.name) / f"worker-{i}.json" for i in range(self.count)]
        cores, gpus = self._cores(), local_gpus(self.count, self.env)
        for i, ready in enumerate(readies):
            env = {**self.env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else self.env
            log = open(self.log_path(i), "wb")  # noqa: SIM115 - the child owns it
            self.procs.append(subprocess.Popen(
                self._command(i, ready), stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=functools.partial(os.sched_setaffinity, 0, cores[i]) if cores
                else None))
        deadline = time.monotonic() + timeout
        for i, (proc, ready) in enumerate(zip(self.procs, readies, strict=True)):
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path(i).read_text(errors="replace")[-2000:]
                    self.stop()
                    raise LocalWorkerError(f"local worker {i} did not start:\n{tail}")
                time.sleep(0.05)
            self.addresses.append(f"127.0.0.1:{json.loads(ready.read_text())['port']}")
        return self.addresses

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self._fresh and self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()
