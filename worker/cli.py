"""`worker serve`: start a Shardline worker that serves a slice of a model's layers (and
`worker cache`, `worker health`)."""

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
from protos import auth, health, tls
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
    serve.add_argument("--cache-dir", type=Path, default=None,
                       help="where the node id and received shards are kept (default: "
                       "$SHARDLINE_CACHE_DIR or ~/.cache/shardline)")
    serve.add_argument("--no-advertise", action="store_true", help="do not announce on mDNS")
    serve.add_argument("--interface", default=None, help="announce on this interface only "
                       "(name or address; default: every LAN interface, no docker/VPN)")
    tls.add_arguments(serve, "worker")
    serve.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cache = sub.add_parser("cache", help="show or remove the shards this machine's workers "
                           "received")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("list", "shards, their models and layers, sizes, last use"),
                       ("prune", "remove partial transfers and unused files; with --model or "
                        "--all, those shards too")):
        c = cache_sub.add_parser(name, help=text)
        c.add_argument("--cache-dir", type=Path, default=None,
                       help="as given to worker serve (default: $SHARDLINE_CACHE_DIR or "
                       "~/.cache/shardline)")
        c.add_argument("--name", default=None, help="only this worker's cache (default: all)")
        if name == "prune":
            c.add_argument("--model", default=None, help="remove this model's shards")
            c.add_argument("--all", action="store_true", help="remove every shard")
    health.add_parser(sub, f"127.0.0.1:{protos.DEFAULT_WORKER_PORT}", "worker")
    return parser


def _write_ready(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, path)


def run_serve(args: argparse.Namespace) -> int:
    from protos import default_cache_dir
    from worker.advertise import check_args, serve_advertised
    from worker.backend import batch_scheduling, detect, tune_allocator
    from worker.identity import node_id
    from worker.metrics import WorkerMetrics, start_metrics_server
    from worker.mlx_thread import SWITCH_INTERVAL
    from worker.server import WorkerConfig

    if problem := check_args(args.cluster, None if args.no_advertise else args.interface):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    name = args.name or socket.gethostname().split(".")[0]
    batch_scheduling()  # before any thread starts: they all inherit it
    tune_allocator()
    cache_dir = args.cache_dir or default_cache_dir()
    hardware = detect(args.memory, cache_dir)
    config = WorkerConfig(
        node_id=node_id(cache_dir, name),
        name=name,
        hardware=hardware,
        cluster=args.cluster,
        models_dir=args.models_dir,
        secret=args.secret,
        cache_dir=cache_dir,
        tls=args.tls,
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

    # the event loop and the MLX thread share the GIL (worker/mlx_thread.py)
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        asyncio.run(serve_advertised(config, args.host, args.port, ready, metrics=metrics,
                                     advertise=not args.no_advertise, interface=args.interface))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """`worker cache list|prune`: the shards under `<cache dir>/weights/<worker name>`."""
    import time

    from protos import default_cache_dir
    from worker.cache import ShardCache

    root = (args.cache_dir or default_cache_dir()) / "weights"
    dirs = sorted(d for d in root.glob("*") if d.is_dir()) if root.is_dir() else []
    if args.name:
        dirs = [d for d in dirs if d.name == args.name]
    if not dirs:
        print(f"no shards under {root}" + (f" for {args.name}" if args.name else ""))
        return 0
    for d in dirs:
        cache = ShardCache(d)
        if args.cache_command == "prune":
            freed = cache.prune(model_id=args.model, everything=args.all)
            print(f"{d.name}: freed {format_size(freed)}")
            continue
        count, size, partial = cache.usage()
        print(f"{d.name}: {count} file(s), {format_size(size)}"
              + (f", {format_size(partial)} of unfinished transfers" if partial else "")
              + f"  ({d})")
        for meta in cache.entries():
            start, end = meta.get("layers", (0, 0))
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("used", 0)))
            print(f"  {meta.get('model_id', '?')}  layers [{start}, {end})  "
                  f"{format_size(meta.get('bytes', 0))}  last used {used}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cache":
        return run_cache(args)
    if args.command == "health":
        return health.run(args)
    try:
        args.secret = auth.read_secret(args.secret_file)
        args.tls = tls.TLS.load(args.tls_cert, args.tls_key, args.tls_ca)
    except (auth.AuthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
