"""`coordinator`: serve a model over workers, plan a split, show status, generate text, make
TLS certificates, ask a server's gRPC health."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

import protos
from protos import auth, health, tls
from protos.units import format_size, parse_size


class CLIError(Exception):
    """A one-line reason the command failed (printed without a traceback)."""


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _sizes(text: str) -> list[int]:
    return [parse_size(p) for p in _csv(text)]


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="plan, load shards and serve the model")
    p.add_argument("--model", help="local MLX model directory or Hugging Face repo id")
    p.add_argument("--demo", action="store_true",
                   help="serve a small built-in random-weight model on two local workers")
    p.add_argument("--workers", type=_csv, default=[], help="static worker list H:P,H:P")
    p.add_argument("--no-discover", action="store_true",
                   help="no mDNS: do not browse for workers nor announce the API "
                   "(--demo never browses)")
    p.add_argument("--min-workers", type=int, default=1,
                   help="plan once this many workers are usable, static ones included; "
                   "waits for more on mDNS (default 1)")
    p.add_argument("--discover-timeout", type=float, default=0,
                   help="give up waiting for --min-workers after this many seconds (0: never)")
    p.add_argument("--interface", default=None,
                   help="browse and announce on this interface only (name or address; "
                   "default: every LAN interface, no docker/VPN)")
    p.add_argument("--no-rebalance", action="store_true",
                   help="workers that join later stay on standby until a "
                   "worker is lost (no re-plan on a join)")
    p.add_argument("--worker-wait", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait at start for --workers that do not answer yet, "
                        "retrying with backoff (a service manager may start the coordinator "
                        "first); 0 fails at once (default 120)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: refuse new requests and let running ones finish "
                        "for up to this long before stopping (default 30)")
    p.add_argument("--recover-timeout", type=float, default=120.0,
                   help="seconds a request waits for the re-plan after a worker is lost, then "
                   "continues where it was (0: fail it at once with UNAVAILABLE)")
    p.add_argument("--local-workers", type=int, default=0,
                   help="start N workers on this machine (stopped on exit)")
    p.add_argument("--local-memory", type=_sizes, default=None,
                   help="memory for each local worker, e.g. 1GiB,2GiB (default: split evenly)")
    p.add_argument("--host", default="0.0.0.0", help="address the APIs listen on")
    p.add_argument("--grpc-port", type=int, default=protos.DEFAULT_GRPC_PORT)
    p.add_argument("--http-port", type=int, default=protos.DEFAULT_HTTP_PORT)
    p.add_argument("--partition", choices=("memory", "balanced"), default="memory")
    p.add_argument("--cluster", default="default", help="cluster name")
    p.add_argument("--secret-file", type=Path, default=None,
                   help="file holding the cluster secret the workers share (or set "
                   "SHARDLINE_SECRET); calls to workers are signed with it")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="file holding the API key clients must send as 'Authorization: Bearer' "
                   "(or set SHARDLINE_API_KEY)")
    p.add_argument("--context", type=int, default=None,
                   help="longest sequence (prompt + output) to reserve KV for")
    p.add_argument("--max-sequences", type=int, default=4,
                   help="sequences to reserve KV memory for on each worker")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a running slot; more get RESOURCE_EXHAUSTED")
    p.add_argument("--prefix-cache-tokens", type=int, default=4096,
                   help="tokens of finished sequences kept for follow-up turns, their KV "
                   "reserved by the plan on every worker (0 disables)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--draft-model", default=None,
                   help="speculative decoding: a small model with the same tokenizer (local "
                   "directory or Hugging Face repo id) run here proposes tokens the pipeline "
                   "checks in one pass (docs/speculation.md)")
    p.add_argument("--num-draft-tokens", type=int, default=3,
                   help="most tokens proposed per step (default 3; adapts per request)")
    p.add_argument("--speculative", choices=("ngram",), default=None,
                   help="speculative decoding by prompt lookup: proposals copied from the "
                   "prompt and the text so far (no draft model)")
    tls.add_arguments(p, "coordinator")


def add_client_parsers(sub: argparse._SubParsersAction) -> None:
    default = f"127.0.0.1:{protos.DEFAULT_GRPC_PORT}"
    s = sub.add_parser("status", help="workers, their layers, memory and health")
    s.add_argument("--address", default=default, help=f"coordinator gRPC address ({default})")
    g = sub.add_parser("generate", help="stream a completion to stdout")
    g.add_argument("--address", default=default, help=f"coordinator gRPC address ({default})")
    for p in (s, g):
        p.add_argument("--api-key-file", type=Path, default=None,
                       help="file holding the coordinator's API key (or set SHARDLINE_API_KEY)")
        p.add_argument("--tls-ca", type=Path, default=None,
                       help="the cluster CA (ca.crt) of a coordinator serving over TLS")
    c = sub.add_parser("certs", help="make a cluster CA and a certificate per host name")
    c.add_argument("--dir", type=Path, required=True, help="where ca.crt, ca.key and each "
                   "NAME.crt / NAME.key go (an existing CA there is kept)")
    c.add_argument("--hosts", type=_csv, required=True,
                   help="comma-separated host names (e.g. mini1.local) or IP addresses")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    from coordinator.plan_cli import add_plan_parser

    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_plan_parser(sub)
    add_client_parsers(sub)
    health.add_parser(sub, f"127.0.0.1:{protos.DEFAULT_GRPC_PORT}", "coordinator")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    from coordinator.app import Coordinator, ServeOptions

    options = ServeOptions(
        model=args.model, demo=args.demo, workers=args.workers,
        local_workers=args.local_workers, local_memory=args.local_memory, host=args.host,
        grpc_port=args.grpc_port, http_port=args.http_port, partition=args.partition,
        cluster=args.cluster,
        context=args.context, max_sequences=args.max_sequences,
        prefill_chunk=args.prefill_chunk, cache_dir=args.cache_dir,
        max_waiting=args.max_waiting, prefix_cache_tokens=args.prefix_cache_tokens,
        discover=not (args.no_discover or args.demo), min_workers=args.min_workers,
        discover_timeout=args.discover_timeout or None, interface=args.interface,
        rebalance=not args.no_rebalance, recover_timeout=args.recover_timeout,
        worker_wait=args.worker_wait,
        secret=args.secret, api_key=args.api_key, tls=args.tls, draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens, speculative=args.speculative,
    )
    coordinator = Coordinator(options, progress=lambda m: print(m, flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await coordinator.start()
        print("ready; Ctrl-C stops", flush=True)
        await stop.wait()
        await coordinator.drain(args.drain_timeout)
    finally:
        await coordinator.stop()


def run_serve(args: argparse.Namespace) -> int:
    from coordinator.cluster.cluster import ClusterError
    from coordinator.cluster.modelinfo import ModelError
    from coordinator.cluster.planner import PlanError
    from coordinator.local import LocalWorkerError

    if args.local_memory and len(args.local_memory) != args.local_workers:
        raise CLIError("--local-memory needs one size per local worker")
    try:
        asyncio.run(_serve(args))
    except (ClusterError, LocalWorkerError, ModelError, PlanError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    return 0


def _rpc_error(e: grpc.RpcError, address: str) -> CLIError:
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return CLIError(f"cannot reach the coordinator at {address}: {e.details()}")
    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CLIError(f"the coordinator at {address} refused: {e.details()} (set "
                        f"{auth.API_KEY_ENV} or pass --api-key-file)")
    return CLIError(f"{e.code().name}: {e.details()}")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the coordinator: over TLS, trusting --tls-ca, when it is given."""
    if args.tls_ca:
        try:
            ca = args.tls_ca.read_bytes()
        except OSError as e:
            raise CLIError(f"--tls-ca {args.tls_ca}: {e.strerror}") from None
        return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca),
                                   options=protos.channel_options())
    return grpc.insecure_channel(args.address, options=protos.channel_options())


def _key_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return ((auth.BEARER_KEY, f"Bearer {args.api_key}"),) if args.api_key else ()


def run_status(args: argparse.Namespace) -> int:
    from protos import inference_pb2, inference_pb2_grpc

    with _channel(args) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            state = stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=10,
                                    metadata=_key_metadata(args))
        except grpc.RpcError as e:
            raise _rpc_error(e, args.address) from None
    print(f"model {state.model}  partition {state.partition}  workers {len(state.workers)}")
    rows = [("NAME", "ADDRESS", "LAYERS", "MEMORY", "BACKEND", "STATUS", "ID")]
    for w in state.workers:
        layers = f"[{w.layer_start}, {w.layer_end})" if w.layer_end else "-"
        status = w.status
        if w.status == "loading" and w.shard_bytes:
            status += (f" {100 * w.shard_bytes_sent // w.shard_bytes}% "
                       f"({format_size(w.shard_bytes_sent)}/{format_size(w.shard_bytes)})")
        rows.append((w.name, w.address, layers, format_size(w.memory_bytes), w.backend,
                     status, w.id))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from protos import inference_pb2, inference_pb2_grpc

    sampling = inference_pb2.SamplingParams()
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    request = inference_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling)
    with _channel(args) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            for msg in stub.Generate(request, metadata=_key_metadata(args)):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            raise _rpc_error(e, args.address) from None
    sys.stdout.write("\n")
    return 0


def run_certs(args: argparse.Namespace) -> int:
    try:
        written = tls.make_certs(args.dir, args.hosts)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    for path in written:
        print(path)
    print(f"give each machine ca.crt and its own NAME.crt / NAME.key: --tls-cert, --tls-key, "
          f"--tls-ca (keep {args.dir / 'ca.key'} safe: it signs new members)")
    return 0


def main(argv: list[str] | None = None) -> int:
    # transformers warns that PyTorch is missing; Shardline only uses its tokenizers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            args.secret = auth.read_secret(args.secret_file)
            args.tls = tls.TLS.load(args.tls_cert, args.tls_key, args.tls_ca)
        if args.command in ("serve", "status", "generate"):
            key = auth.read_secret(args.api_key_file, auth.API_KEY_ENV, "API key", minimum=1)
            args.api_key = key.decode() if key else None
    except (auth.AuthError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from coordinator.plan_cli import run_plan

    commands = {"serve": run_serve, "plan": run_plan, "status": run_status,
                "generate": run_generate, "certs": run_certs, "health": health.run}
    try:
        return commands[args.command](args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
