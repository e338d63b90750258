"""grpc.health.v1 for both programs: a server's statuses and the `worker/coordinator health` probe.

Servers: a worker reports SERVING from the moment it listens, and NOT_SERVING from `SIGTERM`
until its port closes; the coordinator (coordinator/api/service.py) reports SERVING only while
its cluster can serve, and its service `liveness` SERVING as long as it runs. The health
service needs no cluster secret and no API key (protos/auth.py), so Kubernetes' `grpc:`
probes, the container HEALTHCHECK (deploy/docker/healthcheck.py) and load balancers can ask.

Clients: `check()` asks one server, over TLS when given the cluster CA (and, for a worker with
mutual TLS, a certificate the CA signed); `worker health` and `coordinator health` print the
answer and exit 0 only for SERVING.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

OPEN_PREFIX = "/grpc.health.v1.Health/"  # the methods open without a secret or an API key
LIVENESS = "liveness"  # the coordinator's: SERVING while the process runs (probes: liveness)
SERVING = "SERVING"


class HealthError(Exception):
    """The server could not be asked (unreachable, TLS refused, timed out); the message says
    why."""


class Health:
    """A server's grpc.health.v1 statuses: `""` (the whole server) and `services`."""

    def __init__(self, services: Sequence[str] = ()) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = ("", *services)
        self.stopped = False  # `stopping` was called: NOT_SERVING for good

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.services:
            await self.servicer.set(name, status)

    async def stopping(self) -> None:
        """NOT_SERVING for good: watchers hear it at once, later `set` calls change nothing."""
        self.stopped = True
        await self.servicer.enter_graceful_shutdown()


# -- the client side ---------------------------------------------------------------------------
def cert_names(cert: bytes) -> list[str]:
    """The DNS and IP subject names of a PEM certificate (what `coordinator certs` wrote)."""
    from cryptography import x509

    try:
        parsed = x509.load_pem_x509_certificate(cert)
        alt = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [*alt.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]


def check(address: str, service: str = "", *, timeout: float = 5.0, ca: bytes | None = None,
          cert: bytes | None = None, key: bytes | None = None,
          server_name: str | None = None) -> str:
    """The status `address` reports for `service`: "SERVING", "NOT_SERVING", or
    "SERVICE_UNKNOWN" for a name it does not serve. Over TLS when `ca` is given (presenting
    `cert`/`key` for mutual TLS), expecting `server_name` in the server's certificate instead
    of the address's host. HealthError when it cannot be asked."""
    options: list[tuple[str, Any]] = []
    if ca is not None:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert),
                                      options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise HealthError(f"{address}: {e.code().name}: {e.details()}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def add_parser(sub: argparse._SubParsersAction, default_address: str, what: str) -> None:
    """The `health` subcommand of `worker` or `coordinator`."""
    p = sub.add_parser("health", help=f"ask a {what} over grpc.health.v1; exit 0 only while it "
                       "says SERVING (for probes and HEALTHCHECKs)")
    p.add_argument("--address", default=default_address,
                   help=f"the {what}'s gRPC address (default {default_address})")
    p.add_argument("--service", default="",
                   help="the service to ask about (default: the whole server"
                   + ("; `liveness`: SERVING while the process runs)" if what == "coordinator"
                      else ")"))
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--tls-ca", type=Path, default=None,
                   help=f"the cluster CA (ca.crt) of a {what} serving over TLS")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="a certificate the cluster CA signed, with --tls-key (a worker with "
                   "mutual TLS wants one: its own will do)")
    p.add_argument("--tls-key", type=Path, default=None, help="its private key")
    p.add_argument("--tls-server-name", default=None,
                   help="a name in the server's certificate, when the address's host is not "
                   "(default: the first name in --tls-cert, else the address's host)")


def _read(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes()
    except OSError as e:
        raise HealthError(f"{flag} {path}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    """`worker health` / `coordinator health`: print the status; 0 for SERVING, 1 for any
    other answer or none, 2 for flags that do not go together."""
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        print("error: --tls-cert and --tls-key come together, and need --tls-ca",
              file=sys.stderr)
        return 2
    try:
        ca, cert = _read("--tls-ca", args.tls_ca), _read("--tls-cert", args.tls_cert)
        key = _read("--tls-key", args.tls_key)
        name = args.tls_server_name or next(iter(cert_names(cert) if cert else ()), None)
        status = check(args.address, args.service, timeout=args.timeout, ca=ca, cert=cert,
                       key=key, server_name=name)
    except HealthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == SERVING else 1
