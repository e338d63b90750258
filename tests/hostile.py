"""A secret-keyed cluster of processes for hostile-input tests, and what its processes hold."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from conftest import ROOT, GiB

from coordinator.local import LocalWorkers
from protos import auth, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

SECRET = b"a-hostile-test-cluster-secret-0123456789"
PROMPT = [1, 5, 9, 200, 33, 4, 77, 12]
MAX_TOKENS = 12


@dataclass
class Usage:
    """What a process holds: resident memory and open file descriptors."""

    rss_kib: int
    fds: int


def usage(pid: int) -> Usage:
    """VmRSS from /proc/PID/status and the entries of /proc/PID/fd."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
    return Usage(rss, len(os.listdir(f"/proc/{pid}/fd")))


def signed(method: str) -> tuple[tuple[str, str], ...]:
    """Metadata that gets a call of `method` past a worker's cluster-secret check."""
    return ((auth.AUTH_KEY, auth.sign(SECRET, method)),)


class Cluster:
    """Two workers (metrics on) and a coordinator, each its own process, sharing SECRET."""

    def __init__(self, model: Path, cache_dir: Path, workdir: Path) -> None:
        self.workers = LocalWorkers(2, memory=[1 * GiB, 1 * GiB], cache_dir=cache_dir,
                                    names=["x1", "x2"], secret=SECRET,
                                    extra_args=["--metrics-port", "0"])
        self.model = model
        self.log = workdir / "coordinator.log"
        self.proc: subprocess.Popen | None = None
        self.grpc = self.http = ""

    def start(self) -> Cluster:
        self.worker_addresses = self.workers.start()
        env = {**os.environ, auth.SECRET_ENV: os.fsdecode(SECRET)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator", "serve", "--model", str(self.model),
                 "--workers", ",".join(self.worker_addresses), "--no-discover",
                 "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
                 "--context", "256"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"on gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+)",
                                  self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start:\n" + self.log.read_text())
            time.sleep(0.1)
        self.grpc, self.http = f"127.0.0.1:{m.group(1)}", f"127.0.0.1:{m.group(2)}"
        self.channel = grpc.insecure_channel(self.grpc)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.worker_channels = [grpc.insecure_channel(a) for a in self.worker_addresses]
        self.infos = [self.info(i) for i in range(2)]
        self.metrics = [f"127.0.0.1:{info.metrics_port}" for info in self.infos]
        return self

    def info(self, i: int) -> worker_pb2.WorkerInfo:
        method = "/shardline.v1.Worker/Info"
        return worker_pb2_grpc.WorkerStub(self.worker_channels[i]).Info(
            worker_pb2.InfoRequest(), metadata=signed(method), timeout=10)

    @property
    def pids(self) -> dict[str, int]:
        return {"coordinator": self.proc.pid,
                **{f"x{i + 1}": p.pid for i, p in enumerate(self.workers.procs)}}

    def usage(self) -> dict[str, Usage]:
        return {name: usage(pid) for name, pid in self.pids.items()}

    def alive(self) -> None:
        """Every process still runs (a crash would show here first)."""
        dead = {n: p.poll() for n, p in (("coordinator", self.proc),
                                         *((f"x{i + 1}", p) for i, p in
                                           enumerate(self.workers.procs))) if p.poll() is not None}
        assert not dead, f"died: {dead}\n{self.logs()}"

    def generate(self, prompt: list[int] = PROMPT, max_tokens: int = MAX_TOKENS,
                 timeout: float = 60) -> list[int]:
        req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                            SamplingParams(max_tokens=max_tokens))
        return [t for m in self.stub.Generate(req, timeout=timeout) for t in m.token_ids]

    def logs(self) -> str:
        parts = [f"--- coordinator\n{self.log.read_text(errors='replace')[-4000:]}"]
        for i in range(2):
            path = self.workers.log_path(i)
            if path.exists():
                parts.append(f"--- x{i + 1}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for channel in [getattr(self, "channel", None), *getattr(self, "worker_channels", [])]:
            if channel is not None:
                channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.workers.stop()


def settle(measure: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `measure()` until it holds or `timeout` passes (what a process holds comes back
    as it frees things: closed connections, finished threads)."""
    deadline = time.monotonic() + timeout
    while not measure():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def raw_http(address: str, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send `data` as it is on a fresh connection; (HTTP status, body) of the answer, or
    (0, b"") when the server closed the connection without one."""
    with socket.create_connection(host_port(address), timeout=timeout) as s:
        try:
            s.sendall(data)  # (no half-close: a server may take that for a client gone)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered (and closed) before taking everything: read that answer
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    answer = b"".join(chunks)
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return (int(m.group(1)) if m else 0), answer.partition(b"\r\n\r\n")[2]


def post(address: str, path: str, body: bytes, content_type: str = "application/json",
         timeout: float = 30.0) -> tuple[int, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return raw_http(address, head + body, timeout)
