"""A slice of the model launched before its input exists, the GPU waiting for it (CUDA only).

A pipeline stage launches its step when the input arrives, so each stage's launch lies on the
token's path (on an H100 with a slow host, launching ahead saved 0.1 ms of a 16-layer stage's 3.0:
bench/RESULTS-gpu.md, "What a stage's launch and wait cost on the GPU"). Here the step's
graph starts with a kernel that waits, on the GPU, for a flag the host writes after the input's
bytes; the whole graph is launched before either is written. One
process, `--layers` layers of the 8B-shaped 4-bit llama (mlx-lm's layers, a 64-token prompt in
their caches), per step the time from writing the input to having the slice's output:

- `after`: the graph built ahead on placeholder inputs (as worker/lookahead.py does), launched
  layer by layer once the input is written (as worker/stage.py `launch` does);
- `ahead`: the same graph behind the waiting kernel, launched before, then input and flag
  written.

- `polled`: as `after`, but the host spins on a flag a last kernel writes after the output,
  where MLX's wait sleeps until the GPU's interrupt wakes it (`cudaEventBlockingSync`): what
  a stage's wait for its step costs;
- `copied` (with `--read`): as `after`, the output's bits copied by a kernel into a
  host-visible placeholder made once, which the host reads;
- `unread`: as `after`, the output never read on the host (no bytes, nothing compared);
- `pinned` (with `--read`): the input read by a kernel from a page-locked host buffer and
  the output written by a kernel into another (bench/cuda_pinned.py); `pinned_out`: only the
  output so;
- `beside`: as `after`, while another process's waiting kernel spins on the same GPU (as a
  stage launched ahead would while another stage of the pipeline computes on a shared GPU).

With `--read` each step's time ends with its output's bytes on the host, read as a stage reads
them (protos/codec.py `encode_into`: MLX moves a device array into a fresh host-visible
buffer); without it, with the output computed. Each step's output is compared between the
modes (the same bits). The waiting kernel spins on
one of the GPU's SMs until the flag comes; `beside` shows what that costs the GPU's other
processes, which time-slice with it.

    python bench/bench_gpu_wait.py --gpu             # 16 layers, 64 steps
    bench/gpu.sh gpu_wait - --layers 8,16,32
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
from bench_hotpath import GPU_SPEC  # noqa: E402

from coordinator.demo import cached_model  # noqa: E402

# one block: thread 0 waits for the flag to reach `want`, then every thread copies the input's
# bf16 bits (read as volatile: written by the host after the launch) into the output
GATE = """
    const volatile uint32_t* f = reinterpret_cast<const volatile uint32_t*>(flag);
    if (threadIdx.x == 0) {
        while (f[0] < want[0]) {
            __nanosleep(256);
        }
        __threadfence_system();
    }
    __syncthreads();
    const volatile uint16_t* src = reinterpret_cast<const volatile uint16_t*>(bits);
    uint16_t* dst = reinterpret_cast<uint16_t*>(out);
    for (int i = threadIdx.x; i < SIZE; i += blockDim.x) {
        dst[i] = src[i];
    }
"""


# one thread, launched on its own after the slice (MLX commits each `async_eval` to its one
# stream, so it runs once the slice has): the flag the host spins on
SIGNAL = """
    if (threadIdx.x == 0) {
        __threadfence_system();
        volatile uint32_t* f = const_cast<volatile uint32_t*>(
            reinterpret_cast<const volatile uint32_t*>(flag));
        f[0] = 1;
        __threadfence_system();
        out[0] = 1;
    }
"""


# the output's bf16 bits into a host-visible placeholder (written through its const pointer)
COPY = """
    uint16_t* dst = const_cast<uint16_t*>(reinterpret_cast<const uint16_t*>(dst_in));
    const uint16_t* src = reinterpret_cast<const uint16_t*>(bits);
    for (int i = threadIdx.x; i < SIZE; i += blockDim.x) {
        dst[i] = src[i];
    }
    __threadfence_system();
    if (threadIdx.x == 0) {
        out[0] = 1;
    }
"""


def _behind_gate(mx, flag, bits):
    """`bits` (bf16) as the gate kernel passes them on once `flag` reads 1."""
    (out,) = mx.fast.cuda_kernel(name="shardline_gate", input_names=["flag", "want", "bits"],
                                 output_names=["out"], source=GATE)(
        inputs=[flag, mx.array([1], dtype=mx.uint32), bits], template=[("SIZE", bits.size)],
        grid=(256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[bits.shape],
        output_dtypes=[mx.bfloat16])
    return out


def _release(flag_view, stuck: threading.Event) -> None:
    """Write the flag from another thread: the launch is stuck behind the waiting kernel."""
    stuck.set()
    flag_view[0] = 1


def spin() -> None:
    """A process whose waiting kernel spins on the GPU until a line comes on stdin."""
    import mlx.core as mx

    from protos import codec

    flag, flag_view = codec.placeholder((1,), mx.uint32)
    out = _behind_gate(mx, flag, mx.zeros((16,), mx.bfloat16))
    mx.async_eval(out)
    print("spinning", flush=True)
    sys.stdin.readline()
    flag_view[0] = 1
    mx.eval(out)


def _spinner() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--spin"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "spinning":
        raise SystemExit("the spinning process did not start")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="(the 8B shape; needs CUDA)")
    parser.add_argument("--layers", default="16", help="comma-separated slice sizes")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--modes", default="after,polled,ahead,beside",
                        help="after: no waiting kernel (runs on any backend, to check this "
                             "script with the CPU bench model)")
    parser.add_argument("--read", action="store_true",
                        help="each step's time ends with its output's bytes on the host")
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin:
        return spin()
    modes = args.modes.split(",")

    import mlx.core as mx
    import numpy as np
    from cuda_pinned import HostBuffer
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from protos import codec

    cuda = getattr(mx, "cuda", None)
    if {"copied", "pinned", "pinned_out"} & set(modes) and not args.read:
        raise SystemExit("--modes copied, pinned and pinned_out need --read")
    on_gpu = cuda is not None and cuda.is_available()
    if {"ahead", "beside", "polled", "copied", "pinned", "pinned_out"} & set(modes) \
            and not on_gpu:
        raise SystemExit("the waiting kernel needs MLX's CUDA backend (--modes after runs)")
    spec = GPU_SPEC if args.gpu else bench_serving.SPEC
    model, _ = load(str(cached_model(spec)))
    inner = model.model
    hidden = model.args.hidden_size
    signal = mx.fast.cuda_kernel(name="shardline_signal", input_names=["flag"],
                                 output_names=["out"], source=SIGNAL) if "polled" in modes \
        else None
    copy = mx.fast.cuda_kernel(name="shardline_copy", input_names=["bits", "dst_in"],
                               output_names=["out"], source=COPY) if "copied" in modes \
        else None
    prompt = mx.array([[(11 * j) % 2000 + 10 for j in range(64)]])
    sample = inner.embed_tokens(mx.array([[17]])).astype(mx.bfloat16)
    data = np.asarray(sample.view(mx.uint16))  # the input written each step: a real token's

    print(f"model {spec.key()}, MLX {mx.__version__}, {args.steps} steps; ms from writing "
          "the input to the slice's output, median (p90)")
    labels = {"after": "launched after the input", "ahead": "launched ahead, the GPU waiting",
              "beside": "after, another process's kernel waiting",
              "polled": "after, the host polling a flag",
              "copied": "after, the output copied to a host-visible buffer",
              "unread": "after, the output not read",
              "pinned": "input and output through page-locked buffers",
              "pinned_out": "output through a page-locked buffer"}
    print("| layers | " + " | ".join(labels[m] for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for count in (int(n) for n in args.layers.split(",")):
        layers = inner.layers[:count]
        times: dict[str, list[float]] = {m: [] for m in modes}
        outputs: dict[str, list[np.ndarray]] = {m: [] for m in modes}
        stuck = threading.Event()
        for mode in times:
            spinner = _spinner() if mode == "beside" else None
            caches = make_prompt_cache(model)[:count]
            h = inner.embed_tokens(prompt)
            for layer, cache in zip(layers, caches, strict=True):
                h = layer(h, "causal", cache)
            mx.eval(h, [c.state for c in caches])
            if mode == "copied":
                dst, dst_view = codec.placeholder((1, 1, hidden), mx.bfloat16)
            if mode.startswith("pinned"):
                src_buf = HostBuffer((1, 1, hidden), mx.bfloat16)
                dst_buf = HostBuffer((1, 1, hidden), mx.bfloat16)
            for step in range(args.steps + 8):
                # the input and the flag as a worker's placeholders (protos/codec.py)
                h, view = (src_buf.read(), src_buf.view) if mode == "pinned" else \
                    codec.placeholder((1, 1, hidden), mx.bfloat16)
                if mode == "ahead":
                    flag, flag_view = codec.placeholder((1,), mx.uint32)
                    h = _behind_gate(mx, flag, h)
                marks = []
                for layer, cache in zip(layers, caches, strict=True):
                    h = layer(h, None, cache)
                    marks.append(h)
                done = None
                if mode == "polled":
                    done_flag, done_view = codec.placeholder((1,), mx.uint32)
                    (done,) = signal(inputs=[done_flag], grid=(32, 1, 1),
                                     threadgroup=(32, 1, 1), output_shapes=[(1,)],
                                     output_dtypes=[mx.uint32])
                if mode == "ahead":
                    # should MLX wait for the GPU while launching, the flag comes anyway
                    rescue = threading.Timer(10.0, _release, args=(flag_view, stuck))
                    rescue.start()
                    for mark in marks:
                        mx.async_eval(mark)
                    rescue.cancel()
                    if stuck.is_set():
                        raise SystemExit("MLX waited for the GPU while launching behind the "
                                         "waiting kernel: nothing to measure")
                    time.sleep(0.003)  # the launch done, the GPU waiting
                t0 = time.perf_counter()
                view[...] = data
                if mode == "ahead":
                    flag_view[0] = 1
                else:
                    for mark in marks:
                        mx.async_eval(mark)
                if done is not None:
                    mx.async_eval(done)
                    while done_view[0] == 0 and time.perf_counter() - t0 < 1.0:
                        pass
                    if done_view[0] == 0:
                        raise SystemExit("the host never saw the last kernel's flag")
                if mode.startswith("pinned"):
                    mx.eval(dst_buf.write(h))
                    got = dst_buf.bytes.tobytes()
                elif mode == "copied":
                    (copied,) = copy(inputs=[h.view(mx.uint16), dst],
                                     template=[("SIZE", hidden)], grid=(256, 1, 1),
                                     threadgroup=(256, 1, 1), output_shapes=[(1,)],
                                     output_dtypes=[mx.uint32])
                    mx.eval(copied)
                    got = dst_view.tobytes()
                else:
                    mx.eval(h)
                    got = bytes(memoryview(codec.wire(h))) if args.read and mode != "unread" \
                        else None
                t1 = time.perf_counter()
                if step >= 8:  # warm-up
                    times[mode].append(t1 - t0)
                    if mode != "unread":
                        outputs[mode].append(got if args.read else
                                             np.asarray(h.astype(mx.float32)))
            if spinner is not None:
                spinner.communicate("go\n", timeout=60)
        compared = [m for m in modes if m != "unread"]
        same = all(all(np.array_equal(a, b) for a, b in zip(
            outputs[compared[0]], outputs[m], strict=True)) for m in compared)
        cells = []
        for mode in modes:
            values = sorted(times[mode])
            cells.append(f"{statistics.median(values) * 1e3:.3f} "
                         f"({values[int(0.9 * len(values))] * 1e3:.3f})")
        print(f"| {count} | " + " | ".join(cells) + " |" +
              ("" if same else " outputs DIFFER"), flush=True)


if __name__ == "__main__":
    main()
