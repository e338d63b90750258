"""Container HEALTHCHECK: find the `worker serve` or `coordinator serve` running here and ask it."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PROGRAMS = ("worker", "coordinator")


def find_command(cmdlines: Iterable[Sequence[str]]) -> tuple[str, list[str]] | None:
    """The first command line that runs `worker serve` or `coordinator serve`, as (program,
    the arguments after the program name). A console script runs as `python .../bin/worker
    serve ...`, so the program is the first or second word."""
    for argv in cmdlines:
        for i, word in enumerate(argv[:2]):
            name = os.path.basename(word)
            if name in PROGRAMS and argv[i + 1:i + 2] == ["serve"]:
                return name, list(argv[i + 1:])
    return None


def running_cmdlines(proc: Path = Path("/proc")) -> list[list[str]]:
    """Every process's command line (Linux), lowest pid first."""
    out = []
    pids = sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for pid in pids:
        try:
            raw = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            out.append([os.fsdecode(w) for w in raw.rstrip(b"\0").split(b"\0")])
    return out


def probe_target(program: str, args: list[str]) -> tuple[str, str, int, str | None]:
    """(kind, host, port, CA file) to ask, read with the program's own argument parser: kind
    "http" or "https" (a coordinator, https with --tls-cert) or "tcp" (a worker)."""
    if program == "coordinator":
        from coordinator.cli import build_parser
    else:
        from worker.cli import build_parser
    parsed = build_parser().parse_args(args)
    host = parsed.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if program == "coordinator":
        ca = getattr(parsed, "tls_ca", None)
        if getattr(parsed, "tls_cert", None):
            return "https", host, parsed.http_port, str(ca) if ca else None
        return "http", host, parsed.http_port, None
    return "tcp", host, parsed.port, None


def check(kind: str, host: str, port: int, ca: str | None = None,
          timeout: float = 4.0) -> str | None:
    """None when healthy, else why not. The coordinator: `GET /health` answers 200 once its
    shards are loaded and its pipeline is whole (503 before); over TLS its certificate must
    be signed by the cluster CA `ca` (it need not name 127.0.0.1). A worker: its gRPC port
    accepts a connection (calls to a worker with a cluster secret must be signed, and with
    TLS it wants a client certificate, so nothing more)."""
    try:
        if kind == "tcp":
            with socket.create_connection((host, port), timeout=timeout):
                return None
        if kind == "https":
            context = ssl.create_default_context(cafile=ca)
            context.check_hostname = False
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read(500).decode(errors="replace")
        finally:
            conn.close()
        return None if resp.status == 200 else f"GET /health: {resp.status} {body}"
    except OSError as e:
        return f"{host}:{port}: {e}"


def main() -> int:
    found = find_command(running_cmdlines())
    if found is None:
        print("no `worker serve` or `coordinator serve` is running", file=sys.stderr)
        return 1
    try:
        target = probe_target(*found)
    except SystemExit:  # argparse could not read it (it printed why)
        return 1
    problem = check(*target)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
