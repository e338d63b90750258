"""What a hop between two worker processes costs, part by part: the socket, the wake-up, the GPU.

Two processes pass a hidden state (8 KiB of bf16, the 8B shape's) back and forth over a TCP
socket on loopback, framed as worker/link.py frames it, each side reading it on the thread that
then computes with it (as a stage's MLX thread does). Per mode, the median time of one hop (half
a round trip), µs:

- `socket`: nothing but the frames, the reader sleeping in `select` as a stage's MLX thread
  does (worker/mlx_thread.py);
- `spin`: the same, the reader polling the socket without sleeping;
- `gpu`: each side writes the bytes into a placeholder made once (protos/codec.py), runs
  `tanh` and `--work` products of a 4096x4096 bf16 matrix with it on the device, reads the
  result's bytes and sends them (a stage's step in small: input in, kernels, output out);
- `gpu_spin`: `gpu` with the polling reader;
- `local`: the `gpu` work of both sides one after the other in one process, no socket: what
  the hop would cost if moving between processes (threads waking, the GPU switching between
  the processes' contexts) were free;
- `gpu_pinned`, `local_pinned`: `gpu` and `local` with the bytes in and out through
  page-locked host buffers a kernel reads and writes (bench/cuda_pinned.py; CUDA only), not
  MLX's managed memory;
- `local_read`: `local` with the input left on the device (the last step's output array, no
  host write), the output's bytes still read: what writing the input costs (against `local`);
- `local_resident`: `local_read` without reading the output (only waiting for it): what the
  read costs, and what is left is the launch, the kernels and the wait.

`gpu - local` is the hop between processes with the work in it; `gpu - gpu_spin` what the
reader's wake-up costs there; `socket` alone the network stack. The last state of `gpu`,
`gpu_spin` and `local` is compared (the same steps in the same order: the same bits, whichever
process computed them).

    python bench/bench_pingpong.py --work 0   # the CPU backend (its bf16 products are slow)
    python bench/bench_pingpong.py --gpu      # a GPU (bench/gpu.sh pingpong -)
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN = 4096
MODES = ("socket", "spin", "gpu", "gpu_spin", "local")
MORE = ("gpu_pinned", "local_pinned", "local_read", "local_resident")  # (by name: --modes)


def _recv_exact(sock: socket.socket, n: int, spin: bool) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if spin:
            try:
                chunk = sock.recv(n - len(buf), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
        else:
            select.select([sock], [], [])
            chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the other side closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, spin: bool) -> bytes:
    size = int.from_bytes(_recv_exact(sock, 4, spin), "big")
    return _recv_exact(sock, size, spin)


def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(len(data).to_bytes(4, "big") + data)


class Work:
    """A stage's step in small: bytes into a placeholder, `n` products on the device, bytes out."""

    def __init__(self, n: int, seed: int, pinned: bool = False) -> None:
        import mlx.core as mx

        from protos.codec import placeholder
        self.mx = mx
        self.n = n
        mx.random.seed(seed)
        self.w = (mx.random.normal((HIDDEN, HIDDEN)) * HIDDEN ** -0.5).astype(mx.bfloat16)
        mx.eval(self.w)
        self.pinned = None
        if pinned:
            from cuda_pinned import HostBuffer
            self.pinned = (HostBuffer((1, HIDDEN), mx.bfloat16),
                           HostBuffer((1, HIDDEN), mx.bfloat16))
            self.view = self.pinned[0].view
        else:
            self.x, self.view = placeholder((1, HIDDEN), mx.bfloat16)

    def compute(self, x):  # noqa: ANN001, ANN201 - an mx.array
        y = self.mx.tanh(x)
        for _ in range(self.n):
            y = self.mx.tanh(y @ self.w)
        return y

    def __call__(self, data: bytes) -> bytes:
        mx = self.mx
        self.view[...] = np.frombuffer(data, np.uint16).reshape(self.view.shape)
        if self.pinned is not None:
            into, out = self.pinned
            mx.eval(out.write(self.compute(into.read())))
            return out.bytes.tobytes()
        y = self.compute(self.x).view(mx.uint16)
        mx.eval(y)
        return bytes(memoryview(y))

    def on_device(self, x, read: bool):  # noqa: ANN001, ANN201 - mx.arrays
        """The step on an input already on the device; `read`: its output's bytes read too."""
        y = self.compute(x)
        self.mx.eval(y)
        if read:
            bytes(memoryview(y.view(self.mx.uint16)))
        return y


def peer(port: int, mode: str, work: int) -> None:
    """The other side: answer every frame (with `gpu` modes, after the work) until closed."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    step = Work(work, 1, mode.endswith("pinned")) if mode.startswith("gpu") else None
    spin = mode.endswith("spin")
    _send_frame(sock, b"ready")
    try:
        while True:
            data = _recv_frame(sock, spin)
            _send_frame(sock, step(data) if step is not None else data)
    except ConnectionError:
        pass


def run_mode(mode: str, steps: int, work: int, gpu: bool) -> tuple[list[float], bytes]:
    """Hop times (s) of `steps` round trips in `mode`, and the state they ended with."""
    first = np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32)
    data = first.astype(np.float16).view(np.uint16).tobytes()  # any 8 KiB
    hops = []
    if mode.startswith("local"):
        a, b = Work(work, 0, mode == "local_pinned"), Work(work, 1, mode == "local_pinned")
        if mode in ("local_read", "local_resident"):
            mx = a.mx
            x = mx.array(np.frombuffer(data, np.uint16).reshape(1, HIDDEN)).view(mx.bfloat16)
            read = mode == "local_read"
            for _ in range(steps):
                t0 = time.perf_counter()
                x = b.on_device(a.on_device(x, read), read)
                hops.append((time.perf_counter() - t0) / 2)
            return hops, bytes(memoryview(x.view(mx.uint16)))
        for _ in range(steps):
            t0 = time.perf_counter()
            data = b(a(data))
            hops.append((time.perf_counter() - t0) / 2)
        return hops, data
    server = socket.create_server(("127.0.0.1", 0))
    port = str(server.getsockname()[1])
    child = subprocess.Popen([sys.executable, __file__, "--peer", mode, port, "--work", str(work)]
                             + (["--gpu"] if gpu else []))
    try:
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        spin = mode.endswith("spin")
        _recv_frame(sock, False)
        step = Work(work, 0, mode.endswith("pinned")) if mode.startswith("gpu") else None
        for _ in range(steps):
            t0 = time.perf_counter()
            _send_frame(sock, step(data) if step is not None else data)
            data = _recv_frame(sock, spin)
            hops.append((time.perf_counter() - t0) / 2)
        sock.close()
    finally:
        child.wait(timeout=30)
        server.close()
    return hops, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the work on the GPU (default: CPU)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--work", type=int, default=4, help="products per side per hop")
    parser.add_argument("--rounds", type=int, default=2, help="every mode this many times")
    parser.add_argument("--peer", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import mlx.core as mx
    if not args.gpu:
        mx.set_default_device(mx.cpu)
    if args.peer is not None:
        peer(int(args.peer[1]), args.peer[0], args.work)
        return
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES) - set(MORE)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES + MORE)}")
    print(f"device {mx.default_device()}, {args.steps} round trips, {args.work} products a side")
    print("| round | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for r in range(args.rounds):
        cells, ends = [], {}
        for mode in modes:
            hops, end = run_mode(mode, args.steps, args.work, args.gpu)
            if mode != "socket" and mode != "spin":
                ends[mode] = end
            hops = hops[args.steps // 10:]  # the warm-up dropped
            q = statistics.quantiles(hops, n=10)
            cells.append(f"{statistics.median(hops) * 1e6:.0f} ({q[-1] * 1e6:.0f})")
        print(f"| {r + 1} | " + " | ".join(cells) + " |", flush=True)
        if len(set(ends.values())) > 1:
            raise SystemExit(f"round {r + 1}: {', '.join(ends)} ended on different bits")
    print("µs a hop, median (p90)")


if __name__ == "__main__":
    main()
