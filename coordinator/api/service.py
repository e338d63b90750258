"""The public gRPC service `shardline.v1.Inference`, with health and reflection beside it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import protos
from coordinator.api.requests import (
    check_prompt,
    check_prompt_text,
    check_sampling,
    encode_chat,
    fill_max_tokens,
    model_not_found,
)
from coordinator.cluster.cluster import Cluster
from coordinator.serving.engine import Engine, RequestError
from protos import inference_pb2, inference_pb2_grpc
from protos.health import LIVENESS
from protos.undecodable import RefuseUndecodable

log = logging.getLogger("shardline.api")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Maps the public API onto the engine; every refusal is a SPEC status code with a reason."""

    def __init__(self, engine: Engine | None, cluster: Cluster) -> None:
        self.engine = engine
        self.cluster = cluster

    def _check_model(self, model: str) -> None:
        if model and model != self.cluster.model.model_id:
            raise model_not_found(model, self.cluster.model.model_id)

    async def _stream(self, ids_fn: Any, request_id: str, sampling: Any, context: Any):
        try:
            if self.engine is None:
                raise RequestError("UNAVAILABLE", "the cluster cannot serve now: shards are "
                                   "not loaded")
            sampling = check_sampling(sampling, context=self.engine.context, prefix="sampling.")
            ids, param = await self.engine.off_loop(ids_fn)
            check_prompt(self.engine, ids, sampling, param, "sampling.max_tokens")
            fill_max_tokens(sampling, len(ids), self.engine.context)
            async for chunk in self.engine.generate(ids, sampling):
                msg = inference_pb2.GenerateResponse(
                    request_id=request_id, text=chunk.text, token_ids=chunk.token_ids,
                    logprobs=chunk.logprobs, finish_reason=chunk.finish_reason,
                )
                if chunk.usage is not None:
                    msg.usage.CopyFrom(chunk.usage)
                yield msg
        except RequestError as e:
            if self.engine is not None:
                self.engine.metrics.count_failure(e)
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: Any):
        def ids() -> tuple[list[int], str]:
            self._check_model(request.model)
            if request.prompt and request.prompt_token_ids:
                raise RequestError("INVALID_ARGUMENT",
                                   "set exactly one of prompt and prompt_token_ids", "prompt")
            if request.prompt_token_ids:
                return list(request.prompt_token_ids), "prompt_token_ids"
            check_prompt_text(self.engine, [request.prompt], "prompt")
            return self.engine.encode_prompt(request.prompt), "prompt"

        async for msg in self._stream(ids, request.request_id, request.sampling, context):
            yield msg

    async def Chat(self, request: inference_pb2.ChatRequest, context: Any):
        def ids() -> tuple[list[int], str]:
            self._check_model(request.model)
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            check_prompt_text(self.engine, [m["content"] for m in messages], "messages")
            return encode_chat(self.engine, messages), "messages"

        async for msg in self._stream(ids, request.request_id, request.sampling, context):
            yield msg

    async def ListModels(self, request: Any, context: Any) -> inference_pb2.ListModelsResponse:
        m = self.cluster.model
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(
            id=m.model_id, num_layers=m.num_layers, weight_bytes=m.weight_bytes)])

    async def GetCluster(self, request: Any, context: Any) -> inference_pb2.ClusterState:
        return self.cluster.state()


async def start_server(service: InferenceService, host: str, port: int,
                       interceptors: Sequence[Any] = (), credentials: Any = None
                       ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start the API server with health (NOT_SERVING until marked; `liveness` SERVING) and
    reflection; over TLS with `credentials`."""
    server = grpc.aio.server(options=protos.channel_options(),
                             interceptors=[*interceptors, RefuseUndecodable()])
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # for liveness probes: this server answers, whatever the cluster's state (protos/health.py)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    bound = protos.listen(server, host, port, credentials)
    await server.start()
    return server, health_servicer, bound


async def set_serving(health_servicer: Any, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    health_servicer.shardline_serving = serving


def not_ready(source: Any) -> str | None:
    """None when `source` (a Coordinator) can serve, else the reason it cannot."""
    cluster = source.cluster
    if source.engine is None or cluster is None or cluster.pipeline is None:
        return "shards are not loaded"
    if source.engine.draining:
        return "shutting down"
    return cluster.pipeline.broken


async def watch_health(health_servicer: Any, source: Any, interval: float = 0.2) -> None:
    """Keep gRPC health in step with `source` (SERVING only while its cluster can serve)."""
    while True:
        now = not_ready(source) is None
        if now != getattr(health_servicer, "shardline_serving", None):
            await set_serving(health_servicer, now)
        await asyncio.sleep(interval)
