"""The Shardline wire: protobuf messages, gRPC stubs, tensor codec and discovery names."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

try:
    __version__ = version("shardline")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

# Bumped whenever worker.proto changes incompatibly; workers of another wire version are skipped.
WIRE_VERSION = 6

# DNS-SD service types (SPEC: Discovery).
WORKER_SERVICE_TYPE = "_shardline._tcp.local."
API_SERVICE_TYPE = "_shardline-api._tcp.local."

# Model families whose slices workers run exactly (SPEC: Model support); others are refused.
SUPPORTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
)

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DEFAULT_WORKER_PORT = 50061

# Message limits: raised on both ends so that large prefill chunks pass (gRPC's default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options used by every Shardline server and channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # servers: accept the peers' keepalive pings (one per 10 s) on an idle connection;
        # the default policy (5 min) answers them with GOAWAY "too many pings", which broke
        # an idle stage-to-stage stream
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def listen(server: Any, host: str, port: int, credentials: Any = None) -> int:
    """Bind a gRPC server to host:port (over TLS with `credentials`) and return the bound
    port; OSError if it cannot.

    grpcio returns 0 or raises RuntimeError on a busy or invalid address, by version.
    """
    why = f"cannot listen on {host}:{port} (in use, or not an address of this host)"
    try:
        bound = server.add_secure_port(f"{host}:{port}", credentials) if credentials \
            else server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        raise OSError(why) from None
    if bound == 0:
        raise OSError(why)
    return bound


def default_cache_dir() -> Path:
    """$SHARDLINE_CACHE_DIR, else the platform's user cache dir plus `shardline`."""
    if env := os.environ.get("SHARDLINE_CACHE_DIR"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "shardline"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shardline"
