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
from coordinator.api import ollama_api
from coordinator.api.anthropic_api import Messages
from coordinator.api.limits import TimelyH11, read_body
from coordinator.api.requests import (
    FieldError,
    Request,
    from_openai,
    model_not_found,
    prompt_ids,
    retry_after,
)
from coordinator.api.responses_api import Responses
from coordinator.api.service import not_ready
from coordinator.api.token_bytes import TokenBytes
from coordinator.serving.engine import Chunk, RequestError
from coordinator.serving.metrics import sd_targets
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
    return JSONResponse(error_body(e.message, type_, e.param, code), status,
                        headers=retry_after(e.code))


def check_unicode(body: Any) -> None:
    """Refuse a string anywhere in a parsed JSON body that is not valid Unicode (JSON lets a
    lone UTF-16 surrogate such as `\\ud800` through), naming the field by its path."""
    todo = [(body, "")]
    while todo:  # no recursion: a body nested as deep as json.loads allows is fine
        value, path = todo.pop()
        if isinstance(value, str):
            _unicode(value, path or "body")
        elif isinstance(value, dict):
            for key, item in value.items():
                _unicode(key, path or "body", "has a key that")
                todo.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            todo.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _unicode(text: str, param: str, what: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(param, f"{what + ' ' if what else ''}is not valid Unicode: a lone "
                         f"UTF-16 surrogate ({text[e.start]!a}) at character {e.start}") from None


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def until_disconnect(request: HttpRequest, work: Awaitable[Any]) -> Any:
    """`await work`, unless the client disconnects first: then `work` is cancelled (so a
    generation stops and frees its slot and KV) and ClientGone is raised."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


def usage_dict(chunk: Chunk) -> dict:
    u = chunk.usage or inference_pb2.Usage()
    out: dict = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                 "total_tokens": u.prompt_tokens + u.completion_tokens}
    if u.draft_tokens:  # speculative decoding, in OpenAI's names for predicted tokens
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": u.accepted_draft_tokens,
            "rejected_prediction_tokens": u.draft_tokens - u.accepted_draft_tokens}
    return out


class Output:
    """Shapes engine chunks into OpenAI chat or completion objects (whole or streamed)."""

    def __init__(self, req: Request, chat: bool, model: str, tokenizer: Any) -> None:
        self.req, self.chat, self.model, self.tokenizer = req, chat, model, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.emitted = 0  # characters of text sent so far
        self.token_bytes = TokenBytes(tokenizer) if req.logprobs else None
        # A detokenizer of our own over the same tokens: where each token's text begins
        # (completions text_offset), as the engine's detokenizer emits it.
        self.detok = getattr(tokenizer, "detokenizer", None) if req.logprobs and not chat \
            else None
        # tools the model may call: its output is read as a whole when it ends
        self.tools = req.tools if chat and req.tools is not None and req.tools.active else None

    def _text_offset(self, token: int) -> int:
        """Where `token`'s text begins in the full text: the detokenizer's text before it (a
        token of a partial UTF-8 character begins where that character will), never past the
        text sent so far (held back for stop strings, or cut by one)."""
        if self.detok is None:
            return self.emitted
        begin = len(self.detok.text)
        self.detok.add_token(token)
        return min(begin, self.emitted)

    def logprobs(self, chunks: list[Chunk]) -> dict | None:
        """The logprobs of these chunks' tokens; call once per chunk, in order."""
        if not self.req.logprobs:
            return None
        decode, raw = self.tokenizer.decode, self.token_bytes
        tokens, tops, offsets = [], [], []
        for c in chunks:
            self.emitted += len(c.text)
            top = c.top_logprobs or [[] for _ in c.token_ids]
            for t, lp, alts in zip(c.token_ids, c.logprobs, top, strict=False):
                tokens.append((t, decode([t]), lp))
                tops.append([(a, decode([a]), alp) for a, alp in alts])
                if not self.chat:
                    offsets.append(self._text_offset(t))
        if self.chat:
            return {"content": [
                {"token": s, "logprob": lp, "bytes": list(raw(t)), "top_logprobs": [
                    {"token": a, "logprob": alp, "bytes": list(raw(i))} for i, a, alp in alts]}
                for (t, s, lp), alts in zip(tokens, tops, strict=True)]}
        return {"tokens": [s for _, s, _ in tokens], "token_logprobs": [lp for *_, lp in tokens],
                "top_logprobs": [{a: alp for _, a, alp in alts} for alts in tops]
                if self.req.top_logprobs else None,
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
        if self.tools is not None:
            choice["message"], choice["finish_reason"] = self.tools.message(
                text, choice["finish_reason"])
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = self._object([choice], stream=False)
        obj["usage"] = usage_dict(last)
        return obj

    def piece(self, text: str | None, chunks: list[Chunk], finish: str | None = None,
              role: bool = False, tool_calls: list[dict] | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": self.logprobs(chunks),
                                  "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._object([choice], stream=True)

    def final_usage(self, last: Chunk) -> dict:
        obj = self._object([], stream=True)
        obj["usage"] = usage_dict(last)
        return obj

    async def events(self, first: Chunk, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, from its first chunk to [DONE]."""
        try:
            if self.chat:
                yield sse(self.piece("", [], role=True))
            chunk = first
            held: list[Chunk] = []  # with tools: the whole output, read when it ends
            while True:
                if self.tools is not None:
                    held.append(chunk)
                elif chunk.text or (self.req.logprobs and chunk.token_ids):
                    yield sse(self.piece(chunk.text, [chunk]))
                if chunk.finish_reason:
                    finish = FINISH.get(chunk.finish_reason, "stop")
                    if self.tools is not None:
                        message, finish = self.tools.message("".join(c.text for c in held),
                                                             finish)
                        yield sse(self.piece(message["content"], held,
                                             tool_calls=self.tools.deltas(
                                                 message.get("tool_calls", []))))
                    yield sse(self.piece(None, [], finish))
                    if self.req.include_usage:
                        yield sse(self.final_usage(chunk))
                    break
                chunk = await anext(chunks)
        except RequestError as e:
            status, type_ = STATUS.get(e.code, (500, "server_error"))
            yield sse(error_body(e.message, type_, e.param, e.code.lower()))
        except StopAsyncIteration:
            pass
        yield "data: [DONE]\n\n"


class OpenAI:
    """The OpenAI dialect of a route: chat completions or completions."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat

    def parse(self, body: Any, engine: Any) -> Request:
        return from_openai(body, chat=self.chat, context=engine.context,
                           tokenizer=engine.tokenizer)

    def output(self, req: Request, model: str, tokenizer: Any) -> Output:
        return Output(req, self.chat, model, tokenizer)

    @staticmethod
    def error(e: RequestError) -> Response:
        return request_error(e)


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
                Route("/v1/models", self.guard(self.models), methods=["GET"]),
                Route("/v1/models/{model:path}", self.guard(self.model), methods=["GET"]),
                Route("/v1/chat/completions", self.guard(self.chat), methods=["POST"]),
                Route("/v1/completions", self.guard(self.completions), methods=["POST"]),
                Route("/v1/messages", self.guard(self.messages), methods=["POST"]),
                Route("/v1/responses", self.guard(self.responses), methods=["POST"]),
                *ollama_api.routes(self),  # Ollama's API
            ],
            exception_handlers={HTTPException: self.http_error, Exception: self.crash},
        )

    def guard(self, handler: Callable[[HttpRequest], Awaitable[Response]]
               ) -> Callable[[HttpRequest], Awaitable[Response]]:
        """`handler`, behind the API key when the coordinator has one (`/health`, `/metrics`
        and `/sd/workers` stay open for load balancers and Prometheus)."""
        key = getattr(getattr(self.source, "options", None), "api_key", None)
        if not key:
            return handler

        async def guarded(request: HttpRequest) -> Response:
            if auth.bearer_matches(request.headers.get("authorization"), key) or \
                    auth.bearer_matches(f"Bearer {request.headers.get('x-api-key', '')}", key):
                return await handler(request)  # x-api-key: Anthropic's clients send it
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
        return JSONResponse(sd_targets(self.source, request.query_params.get("loopback")))

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
        return await self.complete(request, OpenAI(chat=True))

    async def completions(self, request: HttpRequest) -> Response:
        return await self.complete(request, OpenAI(chat=False))

    async def messages(self, request: HttpRequest) -> Response:
        return await self.complete(request, Messages())

    async def responses(self, request: HttpRequest) -> Response:
        return await self.complete(request, Responses())

    async def body(self, request: HttpRequest) -> Any:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind.lower() != "application/json":
            raise FieldError("Content-Type", f"must be application/json, got {kind!r}")
        raw = await read_body(request)  # 413 over MAX_BODY_BYTES, 408 if too slow
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FieldError("body", f"is not valid JSON: {e}") from None
        except RecursionError:
            raise FieldError("body", "is nested too deeply") from None
        check_unicode(body)
        return body

    async def complete(self, request: HttpRequest, dialect: Any) -> Response:
        """One generation request in `dialect` (OpenAI here; coordinator/api/anthropic_api.py):
        its body becomes the one Request form, its chunks its answer, whole or streamed."""
        engine = self.source.engine
        try:
            if engine is None:
                raise RequestError("UNAVAILABLE", "the cluster cannot serve now: shards are not "
                                   "loaded")
            req = dialect.parse(await self.body(request), engine)
            served = self.source.model.model_id
            if req.model and req.model != served:
                raise model_not_found(req.model, served)
            ids = await engine.off_loop(prompt_ids, engine, req)
        except RequestError as e:
            if engine is not None:
                engine.metrics.count_failure(e)
            return dialect.error(e)
        chunks = engine.generate(ids, req.sampling)
        streaming = False
        try:
            try:
                # refusals come before any byte of the response; a client that leaves while
                # its request waits or prefills stops it there
                first = await until_disconnect(request, anext(chunks))
            except RequestError as e:
                engine.metrics.count_failure(e)
                return dialect.error(e)
            out = dialect.output(req, req.model or served, engine.tokenizer)
            if req.stream:
                streaming = True  # _stream owns the chunks from here
                return StreamingResponse(self._stream(out, first, chunks),
                                         media_type=getattr(out, "media_type",
                                                            "text/event-stream"),
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
            try:
                got = await until_disconnect(request, self._collect(first, chunks))
            except RequestError as e:
                return dialect.error(e)
            return JSONResponse(out.whole(got))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not streaming:
                await chunks.aclose()

    @staticmethod
    async def _stream(out: Any, first: Chunk, chunks: AsyncIterator[Chunk]
                      ) -> AsyncIterator[str]:
        try:
            async for event in out.events(first, chunks):
                yield event
        finally:
            await chunks.aclose()

    @staticmethod
    async def _collect(first: Chunk, chunks: AsyncIterator[Chunk]) -> list[Chunk]:
        """Every chunk of a non-streamed response, up to the one with finish_reason."""
        got = [first]
        with contextlib.suppress(StopAsyncIteration):
            while not got[-1].finish_reason:
                got.append(await anext(chunks))
        return got

class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the coordinator's CLI owns SIGINT/SIGTERM."""

    def capture_signals(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class HttpServer:
    """The HTTP API served on the running event loop; `port` is the bound port."""

    def __init__(self, source: Any, host: str, port: int, tls: Any = None) -> None:
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
        # HTTPS with the coordinator's certificate (protos/tls.py) when it has one
        certs = {"ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path)} \
            if tls is not None else {}
        # TimelyH11: a client that never finishes its request is let go (limits.py)
        config = uvicorn.Config(HttpApi(source).app, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=2, http=TimelyH11,
                                **certs)
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
