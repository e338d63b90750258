"""The OpenAI-compatible HTTP API (Starlette on uvicorn, on the coordinator's event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import protos
from coordinator.engine import Chunk, RequestError
from coordinator.metrics import sd_targets
from coordinator.requests import FieldError, Request, from_openai, model_not_found, prompt_ids
from coordinator.service import not_ready
from protos import auth, inference_pb2

log = logging.getLogger("shardline.http")

# gRPC status name -> (HTTP status, OpenAI error type)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "invalid_request_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
}
FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length",
          inference_pb2.FINISH_REASON_CANCELLED: "abort"}
FINGERPRINT = f"shardline-{protos.__version__}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def request_error(e: RequestError) -> JSONResponse:
    status, type_ = STATUS.get(e.code, (500, "server_error"))
    code = "model_not_found" if e.code == "NOT_FOUND" else e.code.lower()
    return JSONResponse(error_body(e.message, type_, getattr(e, "param", None), code), status)


def usage_dict(chunk: Chunk) -> dict:
    u = chunk.usage or inference_pb2.Usage()
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class Output:
    """Shapes engine chunks into OpenAI chat or completion objects (whole or streamed)."""

    def __init__(self, req: Request, chat: bool, model: str, tokenizer: Any) -> None:
        self.req, self.chat, self.model, self.tokenizer = req, chat, model, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offset = 0  # text_offset of the next token (completions logprobs)

    def logprobs(self, chunks: list[Chunk]) -> dict | None:
        if not self.req.logprobs:
            return None
        decode = self.tokenizer.decode
        tokens, tops = [], []
        for c in chunks:
            top = c.top_logprobs or [[] for _ in c.token_ids]
            for t, lp, alts in zip(c.token_ids, c.logprobs, top, strict=False):
                tokens.append((decode([t]), lp))
                tops.append([(decode([a]), alp) for a, alp in alts])
        if self.chat:
            return {"content": [
                {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": [
                    {"token": a, "logprob": alp, "bytes": list(a.encode())} for a, alp in alts]}
                for (s, lp), alts in zip(tokens, tops, strict=True)]}
        offsets = []
        for s, _ in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": [s for s, _ in tokens], "token_logprobs": [lp for _, lp in tokens],
                "top_logprobs": [dict(alts) for alts in tops] if self.req.top_logprobs else None,
                "text_offset": offsets}

    def _object(self, choices: list[dict], stream: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        obj = {"id": self.id, "object": kind + (".chunk" if stream and self.chat else ""),
               "created": self.created, "model": self.model, "system_fingerprint": FINGERPRINT,
               "choices": choices}
        if stream and self.req.include_usage:
            obj["usage"] = None
        return obj

    def whole(self, chunks: list[Chunk]) -> dict:
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        choice: dict[str, Any] = {"index": 0, "logprobs": self.logprobs(chunks),
                                  "finish_reason": FINISH.get(last.finish_reason, "stop")}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = self._object([choice], stream=False)
        obj["usage"] = usage_dict(last)
        return obj

    def piece(self, text: str | None, chunks: list[Chunk], finish: str | None = None,
              role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": self.logprobs(chunks),
                                  "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._object([choice], stream=True)

    def final_usage(self, last: Chunk) -> dict:
        obj = self._object([], stream=True)
        obj["usage"] = usage_dict(last)
        return obj


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class HttpApi:
    """Routes of the HTTP API over a coordinator (anything with `.engine` and `.cluster`)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/sd/workers", self.sd_workers, methods=["GET"]),
                Route("/v1/models", self._guard(self.models), methods=["GET"]),
                Route("/v1/models/{model:path}", self._guard(self.model), methods=["GET"]),
                Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
                Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
            ],
            exception_handlers={HTTPException: self.http_error, Exception: self.crash},
        )

    def _guard(self, handler: Callable[[HttpRequest], Awaitable[Response]]
               ) -> Callable[[HttpRequest], Awaitable[Response]]:
        """`handler`, behind the API key when the coordinator has one (`/health`, `/metrics`
        and `/sd/workers` stay open for load balancers and Prometheus)."""
        key = getattr(getattr(self.source, "options", None), "api_key", None)
        if not key:
            return handler

        async def guarded(request: HttpRequest) -> Response:
            if auth.bearer_matches(request.headers.get("authorization"), key):
                return await handler(request)
            return JSONResponse(
                error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key"),
                401, headers={"WWW-Authenticate": "Bearer"})

        return guarded

    @staticmethod
    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail if exc.status_code != 404 else f"no route {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(message, code=str(exc.status_code)), exc.status_code)

    @staticmethod
    async def crash(request: HttpRequest, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), 500)

    async def health(self, request: HttpRequest) -> Response:
        reason = not_ready(self.source)
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, 503)

    async def prometheus(self, request: HttpRequest) -> Response:
        body, content_type = self.source.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    async def sd_workers(self, request: HttpRequest) -> Response:
        """Prometheus http_sd_configs; ?loopback=HOST rewrites 127.0.0.1 workers to HOST."""
        return JSONResponse(sd_targets(self.source.cluster, request.query_params.get("loopback")))

    def _card(self) -> dict:
        m = self.source.model
        return {"id": m.model_id, "object": "model", "created": int(m.path.stat().st_mtime),
                "owned_by": "shardline"}

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: HttpRequest) -> Response:
        name, served = request.path_params["model"], self.source.model.model_id
        if name != served:
            return request_error(model_not_found(name, served))
        return JSONResponse(self._card())

    async def chat(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _body(self, request: HttpRequest) -> Any:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind.lower() != "application/json":
            raise FieldError("Content-Type", f"must be application/json, got {kind!r}")
        raw = await request.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FieldError("body", f"is not valid JSON: {e}") from None

    async def _complete(self, request: HttpRequest, chat: bool) -> Response:
        engine = self.source.engine
        try:
            if engine is None:
                raise RequestError("UNAVAILABLE", "the cluster cannot serve now: shards are not "
                                   "loaded")
            req = from_openai(await self._body(request), chat=chat, context=engine.context)
            served = self.source.model.model_id
            if req.model and req.model != served:
                raise model_not_found(req.model, served)
            ids = prompt_ids(engine, req)
            chunks = engine.generate(ids, req.sampling)
            first = await anext(chunks)  # refusals come before any byte of the response
        except RequestError as e:
            if engine is not None:
                engine.metrics.count_failure(e)
            return request_error(e)
        out = Output(req, chat, req.model or served, engine.tokenizer)
        if req.stream:
            return StreamingResponse(self._events(out, first, chunks),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        got = [first]
        try:
            while not got[-1].finish_reason:
                got.append(await anext(chunks))
        except RequestError as e:
            return request_error(e)
        except StopAsyncIteration:
            pass
        return JSONResponse(out.whole(got))

    async def _events(self, out: Output, first: Chunk,
                      chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        try:
            if out.chat:
                yield sse(out.piece("", [], role=True))
            chunk = first
            while True:
                if chunk.text or (out.req.logprobs and chunk.token_ids):
                    yield sse(out.piece(chunk.text, [chunk]))
                if chunk.finish_reason:
                    yield sse(out.piece(None, [], FINISH.get(chunk.finish_reason, "stop")))
                    if out.req.include_usage:
                        yield sse(out.final_usage(chunk))
                    break
                chunk = await anext(chunks)
        except RequestError as e:
            status, type_ = STATUS.get(e.code, (500, "server_error"))
            yield sse(error_body(e.message, type_, getattr(e, "param", None), e.code.lower()))
        except StopAsyncIteration:
            pass
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the coordinator's CLI owns SIGINT/SIGTERM."""

    def capture_signals(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class HttpServer:
    """The HTTP API served on the running event loop; `port` is the bound port."""

    def __init__(self, source: Any, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port} (HTTP): {e.strerror}") from None
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(HttpApi(source).app, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=2)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise OSError("the HTTP server stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
        self.sock.close()
