"""Container HEALTHCHECK: find the `worker serve` or `coordinator serve` running here and ask it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PROGRAMS = ("worker", "coordinator")
_WILDCARD = ("", "0.0.0.0", "::", "[::]")


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


def _parser(program: str):
    if program == "coordinator":
        from coordinator.cli import build_parser
    else:
        from worker.cli import build_parser
    return build_parser()


def probe_argv(program: str, args: list[str]) -> list[str]:
    """The `health` command line (for the same program) that asks the server `args` start,
    read with that program's own parser: its gRPC port on this host, over TLS with its own
    certificate and CA when it has them (grpc.health.v1 needs no secret or API key). A
    coordinator says SERVING once its shards are loaded and its pipeline is whole; a worker
    once it listens."""
    parsed = _parser(program).parse_args(args)
    host = "127.0.0.1" if parsed.host in _WILDCARD else parsed.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = parsed.grpc_port if program == "coordinator" else parsed.port
    argv = ["health", "--address", f"{host}:{port}"]
    if parsed.tls_cert:  # its certificate names it (any name will do: we know who it is)
        argv += ["--tls-ca", str(parsed.tls_ca), "--tls-cert", str(parsed.tls_cert),
                 "--tls-key", str(parsed.tls_key)]
    return argv


def main() -> int:
    found = find_command(running_cmdlines())
    if found is None:
        print("no `worker serve` or `coordinator serve` is running", file=sys.stderr)
        return 1
    program, args = found
    try:
        argv = probe_argv(program, args)
    except SystemExit:  # argparse could not read it (it printed why)
        return 1
    if program == "coordinator":
        from coordinator.cli import main as run
    else:
        from worker.cli import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
