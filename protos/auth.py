"""Cluster secret and API keys on the wire: HMAC-signed worker calls, proofs, bearer keys.

Every call to a worker started with a cluster secret (but grpc.health.v1's, open to probes)
carries `x-shardline-auth:
v1:<unix time>:<nonce>:<hex HMAC-SHA256(secret, method, time, nonce)>`. The worker refuses
calls without it, with a bad MAC, a time more than `MAX_SKEW` seconds off its clock, or a
nonce it has already seen (a replay), with `UNAUTHENTICATED`. The secret itself never travels.
In the other direction a worker proves it knows the secret by answering `Info`'s random
challenge with an HMAC, so a coordinator never sends activations to an impostor that announced
itself on mDNS. Clients of the coordinator send `authorization: Bearer <API key>` (gRPC metadata
or HTTP header), as OpenAI clients do.

This authenticates; protos/tls.py encrypts (mutual TLS), and the two work together.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import grpc

AUTH_KEY = "x-shardline-auth"
BEARER_KEY = "authorization"
SECRET_ENV = "SHARDLINE_SECRET"
API_KEY_ENV = "SHARDLINE_API_KEY"
MIN_SECRET_BYTES = 16
MAX_SKEW = 300.0  # seconds between two machines' clocks that a signed call tolerates
_PROOF = b"shardline-info-proof\n"


class AuthError(ValueError):
    """A secret or key that cannot be used (missing file, too short); the message says why."""


def read_secret(path: Path | None, env: str = SECRET_ENV, what: str = "cluster secret",
                minimum: int = MIN_SECRET_BYTES) -> bytes | None:
    """The secret from `path` (surrounding whitespace dropped), else from `$env`; None if
    neither is given. AuthError when the file cannot be read or the secret is too short."""
    if path is not None:
        try:
            value = Path(path).expanduser().read_bytes().strip()
        except OSError as e:
            raise AuthError(f"cannot read the {what} file {path}: {e.strerror}") from None
        source = str(path)
    elif os.environ.get(env):
        value, source = os.fsencode(os.environ[env]).strip(), f"${env}"
    else:
        return None
    if len(value) < minimum:
        raise AuthError(f"the {what} in {source} is {len(value)} bytes; use at least {minimum} "
                        "(for example: openssl rand -hex 32)")
    return value


def new_secret() -> str:
    """A fresh random secret, as hex (what `openssl rand -hex 32` prints)."""
    return secrets.token_hex(32)


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, now: float | None = None) -> str:
    """The `x-shardline-auth` value for one call of `method` (e.g. `/shardline.worker.v1...`)."""
    stamp, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(12)
    return f"v1:{stamp}:{nonce}:{_mac(secret, method, stamp, nonce)}"


class Verifier:
    """Checks signed calls: MAC, clock skew, and nonces seen within the skew window."""

    def __init__(self, secret: bytes, max_skew: float = MAX_SKEW) -> None:
        self._secret = secret
        self.max_skew = max_skew
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it expires

    def check(self, method: str, value: str | None, now: float | None = None) -> str | None:
        """None if `value` authenticates a call of `method`, else why not (for the caller)."""
        now = time.time() if now is None else now
        if not value:
            return "this worker needs the cluster secret (start the coordinator with --secret-file)"
        try:
            version, stamp, nonce, mac = value.split(":")
            when = int(stamp)
        except ValueError:
            return "malformed x-shardline-auth metadata"
        if version != "v1":
            return f"unknown auth version {version!r}"
        if not hmac.compare_digest(mac, _mac(self._secret, method, stamp, nonce)):
            return "wrong cluster secret"
        if abs(now - when) > self.max_skew:
            return (f"the caller's clock is {now - when:+.0f} s from this worker's (more than "
                    f"{self.max_skew:.0f} s): synchronise the clocks (NTP)")
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return "a replayed call (this nonce was already used)"
        self._seen[nonce] = now + 2 * self.max_skew
        return None


def prove(secret: bytes, challenge: bytes) -> bytes:
    """A worker's answer to `Info`'s challenge."""
    return hmac.new(secret, _PROOF + challenge, hashlib.sha256).digest()


def proves(secret: bytes, challenge: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(proof, prove(secret, challenge))


def bearer_matches(value: str | None, key: str) -> bool:
    """Whether an `Authorization` value is `Bearer <key>` (compared in constant time)."""
    if not value or not value.startswith("Bearer "):
        return False
    return hmac.compare_digest(value[7:].strip().encode(), key.encode())


def bearer_ok(metadata: Any, key: str) -> bool:
    """Whether gRPC `metadata` carries `authorization: Bearer <key>`."""
    return any(k == BEARER_KEY and isinstance(v, str) and bearer_matches(v, key)
               for k, v in metadata or ())


# -- client side: sign every call on a channel ---------------------------------------------
class _Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = d.method.decode() if isinstance(d.method, bytes) else d.method
        metadata = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata else ()))
        metadata.add(AUTH_KEY, sign(self._secret, method))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials,
                                          d.wait_for_ready)


# grpc.aio files an interceptor under the first of these kinds it is an instance of, so each
# kind of call needs its own class
class _SignUnaryUnary(_Signer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _SignUnaryStream(_Signer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _SignStreamUnary(_Signer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _SignStreamStream(_Signer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def worker_channel(address: str, secret: bytes | None,
                   options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """An asyncio channel to a worker; every call on it is signed when `secret` is set, and it
    runs over mutual TLS when this process has a certificate (protos/tls.py)."""
    from protos import tls

    interceptors = [kind(secret) for kind in (_SignUnaryUnary, _SignUnaryStream,
                                              _SignStreamUnary, _SignStreamStream)] \
        if secret else None
    if (mine := tls.current()) is not None:
        return grpc.aio.secure_channel(address, mine.channel_credentials(), options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


# -- server side: refuse what does not authenticate -------------------------------------------
def _refusal(handler: Any, reason: str) -> Any:
    """A handler of `handler`'s kind that ends the call with UNAUTHENTICATED."""
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - abort raises

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    kind = (handler.request_streaming, handler.response_streaming)
    return kinds[kind](streaming if handler.response_streaming else unary,
                       request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


class ServerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls that do not authenticate, except methods under `open_prefixes`.

    `check(method, metadata)` returns None to let a call through, else the reason."""

    def __init__(self, check: Any, open_prefixes: tuple[str, ...] = ()) -> None:
        self._check = check
        self._open = open_prefixes
        self.refused = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        reason = self._check(details.method, details.invocation_metadata)
        if reason is None:
            return handler
        self.refused += 1
        return _refusal(handler, reason)


# a worker's methods open without the secret: grpc.health.v1 only (probes sign nothing)
OPEN_WORKER = ("/grpc.health.v1.Health/",)


def worker_auth(secret: bytes) -> ServerAuth:
    """The interceptor a worker started with a cluster secret runs every call through (all
    but `OPEN_WORKER`)."""
    verifier = Verifier(secret)

    def check(method: str, metadata: Any) -> str | None:
        value = next((v for k, v in metadata or () if k == AUTH_KEY), None)
        return verifier.check(method, value)

    return ServerAuth(check, OPEN_WORKER)


def api_key_auth(key: str, open_prefixes: tuple[str, ...]) -> ServerAuth:
    """The interceptor a coordinator started with an API key runs its API through."""
    def check(method: str, metadata: Any) -> str | None:
        if bearer_ok(metadata, key):
            return None
        return "missing or wrong API key (send 'authorization: Bearer <key>')"

    return ServerAuth(check, open_prefixes)
