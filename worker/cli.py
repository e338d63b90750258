"""`worker serve`: start a Shardline worker that serves a slice of a model's layers."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path

import protos
from protos import auth
from protos.units import format_size, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve layer slices to a coordinator")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    serve.add_argument("--port", type=int, default=protos.DEFAULT_WORKER_PORT,
                       help=f"gRPC port (default {protos.DEFAULT_WORKER_PORT}; 0 picks a free one)")
    serve.add_argument("--metrics-port", type=int, default=0,
                       help="Prometheus metrics port on --host (default 0 picks a free one; "
                       "advertised as mport)")
    serve.add_argument("--name", default=None, help="name shown in status and metrics "
                       "(default: the host name)")
    serve.add_argument("--memory", type=parse_size, default=None,
                       help="usable memory for weights and KV, e.g. 16GiB (default: detected)")
    serve.add_argument("--cluster", default="default", help="cluster name (default: default)")
    serve.add_argument("--secret-file", type=Path, default=None,
                       help="file holding the cluster secret, at least 16 bytes (or set "
                       "SHARDLINE_SECRET); every call to this worker must then prove it")
    serve.add_argument("--models-dir", type=Path, default=None,
                       help="directory of MLX models, looked up by model id")
    serve.add_argument("--cache-dir", type=Path, default=None, help="where the node id is kept")
    serve.add_argument("--no-advertise", action="store_true", help="do not announce on mDNS")
    serve.add_argument("--interface", default=None, help="announce on this interface only "
                       "(name or address; default: every LAN interface, no docker/VPN)")
    serve.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _write_ready(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, path)


def run_serve(args: argparse.Namespace) -> int:
    from protos import default_cache_dir
    from worker.advertise import check_args, serve_advertised
    from worker.backend import detect
    from worker.identity import node_id
    from worker.metrics import WorkerMetrics, start_metrics_server
    from worker.server import WorkerConfig

    if problem := check_args(args.cluster, None if args.no_advertise else args.interface):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    name = args.name or socket.gethostname().split(".")[0]
    cache_dir = args.cache_dir or default_cache_dir()
    hardware = detect(args.memory, cache_dir)
    config = WorkerConfig(
        node_id=node_id(cache_dir, name),
        name=name,
        hardware=hardware,
        cluster=args.cluster,
        models_dir=args.models_dir,
        secret=args.secret,
    )
    print(
        f"worker {name}: {hardware.backend} {hardware.chip}, "
        f"{format_size(hardware.memory_bytes)} usable",
        file=sys.stderr,
    )
    if not args.secret:
        print(f"worker {name}: no cluster secret: anyone who can reach this port can load "
              "models on it and run them (pass --secret-file or set SHARDLINE_SECRET)",
              file=sys.stderr)

    metrics = WorkerMetrics(hardware.memory_bytes)
    try:
        _, config.metrics_port = start_metrics_server(metrics, args.host, args.metrics_port)
    except OSError as e:
        print(f"error: metrics port {args.metrics_port}: {e}", file=sys.stderr)
        return 1

    def ready(port: int) -> None:
        print(f"worker {name} listening on {args.host}:{port} (metrics on "
              f":{config.metrics_port}/metrics)", file=sys.stderr, flush=True)
        if args.ready_file:
            _write_ready(args.ready_file, port)

    try:
        asyncio.run(serve_advertised(config, args.host, args.port, ready, metrics=metrics,
                                     advertise=not args.no_advertise, interface=args.interface))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.secret = auth.read_secret(args.secret_file)
    except auth.AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
