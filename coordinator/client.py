"""Python client for a coordinator's gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

    >>> with Client("127.0.0.1:50051") as c:                       # doctest: +SKIP
    ...     print(c.generate("Hello", max_tokens=20).text)
    ...     for piece in c.stream(messages=[{"role": "user", "content": "Hi"}]):
    ...         print(piece.text, end="")

Refusals raise a `ShardlineError` subclass named after the gRPC status (`InvalidRequest`,
`ModelNotFound`, `ServerBusy`, `Unavailable`, ...), with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import protos
from protos import inference_pb2, inference_pb2_grpc

FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length",
          inference_pb2.FINISH_REASON_CANCELLED: "cancelled"}


# -- errors -------------------------------------------------------------------------------------
class ShardlineError(Exception):
    """A call the coordinator refused or could not answer; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(ShardlineError):
    """INVALID_ARGUMENT: a bad field (the message names it) or a prompt too long."""


class ModelNotFound(ShardlineError):
    """NOT_FOUND: the coordinator serves another model."""


class ServerBusy(ShardlineError):
    """RESOURCE_EXHAUSTED: every slot is taken and the queue is full; retry later."""


class Unavailable(ShardlineError):
    """UNAVAILABLE: the coordinator is unreachable or its cluster cannot serve now."""


class Unauthenticated(ShardlineError):
    """UNAUTHENTICATED: a missing or wrong API key."""


class DeadlineExceeded(ShardlineError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


_ERRORS: dict[str, type[ShardlineError]] = {
    "INVALID_ARGUMENT": InvalidRequest, "NOT_FOUND": ModelNotFound,
    "RESOURCE_EXHAUSTED": ServerBusy, "UNAVAILABLE": Unavailable,
    "UNAUTHENTICATED": Unauthenticated, "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def _error(e: grpc.RpcError) -> ShardlineError:
    code = e.code().name if e.code() is not None else "UNKNOWN"
    return _ERRORS.get(code, ShardlineError)(code, e.details() or code)


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_seconds: float
    decode_tokens_per_second: float


@dataclass(frozen=True)
class Delta:
    """One streamed piece: new text and tokens; the last one has finish_reason and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Completion:
    """A whole answer: text, tokens, their logprobs, why it ended ("stop", "length"), usage."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    name: str
    address: str
    memory_bytes: int
    backend: str
    layer_start: int
    layer_end: int
    status: str


@dataclass(frozen=True)
class ClusterInfo:
    model: str
    partition: str
    workers: list[WorkerInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ModelCard:
    id: str
    num_layers: int
    weight_bytes: int


class Sampling(TypedDict, total=False):
    """Sampling options, as in SamplingParams (SPEC); unset ones take the server's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    stop: str | Sequence[str]
    logprobs: int
    model: str
    # structured output (docs/structured.md), at most one: the output always matches it
    json_schema: str | Mapping[str, Any]  # a JSON schema (a dict, or its JSON text)
    json_object: bool
    regex: str
    choice: Sequence[str]
    grammar: str  # Lark


Message = Mapping[str, str] | tuple[str, str]


def _credentials(tls_ca: str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS trusting the cluster CA file `tls_ca` (a coordinator serving over TLS), or None."""
    return grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None


def _request(prompt: str | Sequence[int] | None, messages: Iterable[Message] | None,
             options: Sampling) -> inference_pb2.GenerateRequest | inference_pb2.ChatRequest:
    opts = dict(options)
    model = opts.pop("model", "")
    stop = opts.pop("stop", None)
    if not isinstance(opts.get("json_schema", ""), str):
        opts["json_schema"] = json.dumps(opts["json_schema"])
    sampling = inference_pb2.SamplingParams(**opts)
    if stop is not None:
        sampling.stop.extend([stop] if isinstance(stop, str) else stop)
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt and messages")
    if messages is not None:
        msgs = [inference_pb2.ChatMessage(role=m[0], content=m[1]) if isinstance(m, tuple)
                else inference_pb2.ChatMessage(role=m["role"], content=m["content"])
                for m in messages]
        return inference_pb2.ChatRequest(model=model, messages=msgs, sampling=sampling)
    if isinstance(prompt, str):
        return inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling)
    return inference_pb2.GenerateRequest(model=model, prompt_token_ids=list(prompt),
                                         sampling=sampling)


def _delta(msg: inference_pb2.GenerateResponse) -> Delta:
    u = msg.usage if msg.HasField("usage") else None
    return Delta(
        text=msg.text, token_ids=list(msg.token_ids), logprobs=list(msg.logprobs),
        finish_reason=FINISH.get(msg.finish_reason),
        usage=Usage(u.prompt_tokens, u.completion_tokens, u.time_to_first_token_seconds,
                    u.decode_tokens_per_second) if u is not None else None,
    )


def _join(deltas: list[Delta]) -> Completion:
    last = deltas[-1] if deltas else Delta("", [], [])
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=[lp for d in deltas for lp in d.logprobs],
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(0, 0, 0.0, 0.0),
    )


def _cluster(state: inference_pb2.ClusterState) -> ClusterInfo:
    return ClusterInfo(model=state.model, partition=state.partition, workers=[
        WorkerInfo(w.id, w.name, w.address, w.memory_bytes, w.backend, w.layer_start,
                   w.layer_end, w.status) for w in state.workers])


def _models(resp: inference_pb2.ListModelsResponse) -> list[ModelCard]:
    return [ModelCard(m.id, m.num_layers, m.weight_bytes) for m in resp.models]


class _Base:
    def __init__(self, address: str, api_key: str | None, timeout: float | None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    _stub: Any

    def _call(self, stub_method: Any, request: Any) -> Any:
        return stub_method(request, timeout=self.timeout, metadata=self._metadata)

    def _start(self, prompt: str | Sequence[int] | None, messages: Iterable[Message] | None,
               options: Sampling) -> Any:
        """The streaming call for a prompt (Generate) or messages (Chat)."""
        request = _request(prompt, messages, options)
        method = self._stub.Chat if isinstance(request, inference_pb2.ChatRequest) \
            else self._stub.Generate
        return self._call(method, request)


# -- blocking -----------------------------------------------------------------------------------
class Client(_Base):
    """Blocking client; safe to share between threads. Use as a context manager or `close()`."""

    def __init__(self, address: str = f"127.0.0.1:{protos.DEFAULT_GRPC_PORT}", *,
                 api_key: str | None = None, timeout: float | None = None,
                 tls_ca: str | Path | None = None) -> None:
        super().__init__(address, api_key, timeout)
        creds = _credentials(tls_ca)
        self._channel = grpc.secure_channel(address, creds, options=protos.channel_options()) \
            if creds else grpc.insecure_channel(address, options=protos.channel_options())
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def stream(self, prompt: str | Sequence[int] | None = None, *,
               messages: Iterable[Message] | None = None,
               **options: Unpack[Sampling]) -> Iterator[Delta]:
        """Stream a completion of `prompt` (text or token ids) or a chat of `messages`."""
        call = self._start(prompt, messages, options)
        try:
            for msg in call:
                yield _delta(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # no-op once finished; frees the server's slot if we stop early

    def generate(self, prompt: str | Sequence[int], **options: Unpack[Sampling]) -> Completion:
        return _join(list(self.stream(prompt, **options)))

    def chat(self, messages: Iterable[Message], **options: Unpack[Sampling]) -> Completion:
        return _join(list(self.stream(messages=messages, **options)))

    def models(self) -> list[ModelCard]:
        try:
            return _models(self._call(self._stub.ListModels, inference_pb2.ListModelsRequest()))
        except grpc.RpcError as e:
            raise _error(e) from None

    def cluster(self) -> ClusterInfo:
        try:
            return _cluster(self._call(self._stub.GetCluster, inference_pb2.GetClusterRequest()))
        except grpc.RpcError as e:
            raise _error(e) from None

    def ready(self) -> bool:
        """True when grpc.health.v1 says SERVING (shards loaded, cluster whole)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = self._call(stub.Check, health_pb2.HealthCheckRequest())
        except grpc.RpcError as e:
            raise _error(e) from None
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- asyncio ------------------------------------------------------------------------------------
class AsyncClient(_Base):
    """asyncio client; create and use it on one event loop. `async with` or `await close()`."""

    def __init__(self, address: str = f"127.0.0.1:{protos.DEFAULT_GRPC_PORT}", *,
                 api_key: str | None = None, timeout: float | None = None,
                 tls_ca: str | Path | None = None) -> None:
        super().__init__(address, api_key, timeout)
        creds = _credentials(tls_ca)
        self._channel = grpc.aio.secure_channel(address, creds,
                                                options=protos.channel_options()) \
            if creds else grpc.aio.insecure_channel(address, options=protos.channel_options())
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def stream(self, prompt: str | Sequence[int] | None = None, *,
                     messages: Iterable[Message] | None = None,
                     **options: Unpack[Sampling]) -> AsyncIterator[Delta]:
        """Stream a completion of `prompt` (text or token ids) or a chat of `messages`."""
        call = self._start(prompt, messages, options)
        try:
            async for msg in call:
                yield _delta(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # no-op once finished; frees the server's slot if we stop early

    async def generate(self, prompt: str | Sequence[int],
                       **options: Unpack[Sampling]) -> Completion:
        return _join([d async for d in self.stream(prompt, **options)])

    async def chat(self, messages: Iterable[Message], **options: Unpack[Sampling]) -> Completion:
        return _join([d async for d in self.stream(messages=messages, **options)])

    async def models(self) -> list[ModelCard]:
        try:
            return _models(await self._call(self._stub.ListModels,
                                             inference_pb2.ListModelsRequest()))
        except grpc.RpcError as e:
            raise _error(e) from None

    async def cluster(self) -> ClusterInfo:
        try:
            return _cluster(await self._call(self._stub.GetCluster,
                                             inference_pb2.GetClusterRequest()))
        except grpc.RpcError as e:
            raise _error(e) from None

    async def ready(self) -> bool:
        """True when grpc.health.v1 says SERVING (shards loaded, cluster whole)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await self._call(stub.Check, health_pb2.HealthCheckRequest())
        except grpc.RpcError as e:
            raise _error(e) from None
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
