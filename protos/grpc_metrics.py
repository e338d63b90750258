"""gRPC server metrics (go-grpc-prometheus names) through a grpc.aio server interceptor."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# Streams (a pipeline Forward, a long generation) live for minutes: buckets reach 10 minutes.
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

LABELS = ("grpc_type", "grpc_service", "grpc_method")
KINDS = (
    ("unary", "unary_unary", grpc.unary_unary_rpc_method_handler),
    ("server_stream", "unary_stream", grpc.unary_stream_rpc_method_handler),
    ("client_stream", "stream_unary", grpc.stream_unary_rpc_method_handler),
    ("bidi_stream", "stream_stream", grpc.stream_stream_rpc_method_handler),
)


class GrpcServerMetrics:
    """grpc_server_started_total, grpc_server_handled_total, grpc_server_handling_seconds."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.",
                               LABELS, registry=registry)
        self.handled = Counter("grpc_server_handled_total",
                               "RPCs completed on the server, by status code.",
                               (*LABELS, "grpc_code"), registry=registry)
        self.handling = Histogram("grpc_server_handling_seconds",
                                  "Time from the start of an RPC to its status, by method and "
                                  "status code.", (*LABELS, "grpc_code"),
                                  buckets=HANDLING_BUCKETS, registry=registry)


def _split(full_method: str) -> tuple[str, str]:
    """'/shardline.v1.Worker/Forward' -> ('shardline.v1.Worker', 'Forward')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _code(context: Any, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"
    return "OK"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC by service, method, type and final status code."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        found = next((k for k in KINDS if getattr(handler, k[1]) is not None), None)
        if found is None:
            return handler
        kind, attr, factory = found
        behavior = getattr(handler, attr)
        labels = (kind, service, method)
        return factory(self._wrap(behavior, labels),
                       request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _done(self, labels: tuple[str, str, str], context: Any, error: BaseException | None,
              t0: float) -> None:
        code = _code(context, error)
        self.metrics.handled.labels(*labels, code).inc()
        self.metrics.handling.labels(*labels, code).observe(time.perf_counter() - t0)

    def _wrap(self, behavior: Callable, labels: tuple[str, str, str]) -> Callable:
        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: Any):
                self.metrics.started.labels(*labels).inc()
                t0, error = time.perf_counter(), None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    self._done(labels, context, error, t0)

            return stream

        async def call(request: Any, context: Any) -> Any:
            self.metrics.started.labels(*labels).inc()
            t0, error = time.perf_counter(), None
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as e:
                error = e
                raise
            finally:
                self._done(labels, context, error, t0)

        return call


def server_interceptor(registry: CollectorRegistry) -> MetricsInterceptor:
    """An interceptor recording into `registry`, for `grpc.aio.server(interceptors=[...])`."""
    return MetricsInterceptor(GrpcServerMetrics(registry))
