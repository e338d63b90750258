"""CUDA backend: the host spins on a flag a step's last kernel sets, where MLX's wait sleeps.

MLX waits for a CUDA step's values with `cudaEventSynchronize` on an event made with
`cudaEventBlockingSync`: the thread sleeps until the GPU's interrupt wakes it. A pipeline stage
waits like that once a step, with the token's path standing still until it wakes, where mlx-lm
hides the wait behind its next step. Here a one-thread kernel, launched after the step's own
(on MLX's one stream, in the step's order), sets a flag in memory the host can read, and the
waiting thread polls it (giving up the GIL between reads) before MLX's wait, which then finds
the step done. `bench/bench_gpu_wait.py` measures both waits. SHARDLINE_CUDA_POLL=0 turns it off.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from protos import codec
from worker.backend import accelerator

SPIN_LIMIT = 0.05  # seconds polled before falling back to MLX's wait (a long prompt chunk)

# one thread, launched on its own after the step's (MLX commits each `async_eval` to its one
# stream, so it runs once the step has)
SOURCE = """
    if (threadIdx.x == 0) {
        __threadfence_system();
        volatile uint32_t* f = const_cast<volatile uint32_t*>(
            reinterpret_cast<const volatile uint32_t*>(flag));
        f[0] = 1;
        __threadfence_system();
        out[0] = 1;
    }
"""

log = logging.getLogger("shardline.worker")

_kernel: Any = None
_works: bool | None = None  # None: not checked yet in this process


@dataclass
class Flag:
    """A launched signal: `out` is its kernel's output, `view` the host's view of the flag."""

    out: mx.array
    view: Any


def enabled() -> bool:
    """Whether steps get a flag here: the CUDA backend, SHARDLINE_CUDA_POLL not 0, and (checked
    once) the host sees the flag the kernel sets."""
    global _works
    if _works is None:
        _works = accelerator() == "cuda" and \
            os.environ.get("SHARDLINE_CUDA_POLL", "1") != "0" and _check()
    return _works


def _check() -> bool:
    try:
        if _poll(_launch(), 5.0):
            return True
        log.warning("the host does not see a CUDA kernel's flag: steps wait in MLX's wait")
    except Exception:  # noqa: BLE001 - no kernel here: MLX's wait it is
        log.exception("the signal kernel failed: steps wait in MLX's wait")
    return False


def _launch() -> Flag:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="shardline_signal", input_names=["flag"],
                                      output_names=["out"], source=SOURCE)
    flag, view = codec.placeholder((1,), mx.uint32)
    (out,) = _kernel(inputs=[flag], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                     output_shapes=[(1,)], output_dtypes=[mx.uint32])
    mx.async_eval(out)
    return Flag(out, view)


def after(targets: list[Any]) -> Flag | None:
    """Launch the signal behind `targets` (a step just launched with `mx.async_eval`);
    None where polling is off or there is nothing to wait for."""
    if not targets or not enabled():
        return None
    return _launch()


def _poll(flag: Flag, limit: float) -> bool:
    view = flag.view
    end = time.perf_counter() + limit
    while view[0] == 0:
        if time.perf_counter() > end:
            return False
        time.sleep(0)  # lets the process's other threads have the GIL
    return True


def wait(flag: Flag | None, limit: float = SPIN_LIMIT) -> bool:
    """Poll `flag` until its kernel ran or `limit` seconds passed; True when it ran. After
    the limit, MLX's wait for the flag's kernel (it runs after the step: the step's values are
    then there too); should the flag still read unset, polling stops in this process."""
    global _works
    if flag is None:
        return False
    if _poll(flag, limit):
        return True
    mx.eval(flag.out)
    if flag.view[0] == 0:
        log.warning("a CUDA kernel's flag never reached the host: steps wait in MLX's wait")
        _works = False
    return False
