"""Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`) as a dialect of the HTTP API, so Ollama clients list and use the served model.

A thin translation, as coordinator/api/anthropic_api.py: the body becomes an OpenAI body checked by
the one request path (coordinator/api/requests.py), `options` naming the sampling fields as Ollama
does; the answer is one JSON object or NDJSON lines (Ollama streams by default).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.api.requests import (
    FieldError,
    Request,
    from_openai,
    model_not_found,
    renamed,
    retry_after,
)
from coordinator.serving.engine import Chunk, RequestError
from protos import inference_pb2

VERSION = "0.6.0"  # the Ollama API version these routes follow
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
           "num_predict": "max_tokens", "stop": "stop", "min_p": "min_p",
           "repeat_penalty": "repetition_penalty"}
# OpenAI body names in errors -> Ollama's
PARAMS = {v: f"options.{k}" for k, v in OPTIONS.items()} | {"response_format": "format"}
STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAUTHENTICATED": 401,
          "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


def error_response(e: RequestError) -> Response:
    return JSONResponse({"error": e.message}, STATUS.get(e.code, 500),
                        headers=retry_after(e.code))


def bare(model: str) -> str:
    """An Ollama model name without its default tag (`name:latest` is `name`)."""
    return model[: -len(":latest")] if model.endswith(":latest") else model


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise FieldError("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "must be an object with role and content")
        msg: dict[str, Any] = {"role": m.get("role"), "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": f"call_{i}_{j}", "type": "function", "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": (c.get("function") or {}).get("arguments") or {}}}
                for j, c in enumerate(m["tool_calls"]) if isinstance(c, dict)]
        out.append(msg)
    return out


def to_openai(body: Any, chat: bool) -> dict:
    """The OpenAI body (chat or completions) that asks for the same as an Ollama body."""
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise FieldError("model", f"must be a string, got {type(model).__name__}")
    out: dict[str, Any] = {"model": bare(model), "stream": body.get("stream", True)}
    if chat:
        out["messages"] = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise FieldError("prompt", "is required (a non-empty string)")
        if body.get("system") and not body.get("raw"):
            out["messages"] = [{"role": "system", "content": body["system"]},
                               {"role": "user", "content": prompt}]
        elif body.get("raw"):
            out["prompt"] = prompt
        else:
            out["messages"] = [{"role": "user", "content": prompt}]
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise FieldError("options", "must be an object")
    for name, field in OPTIONS.items():
        if options.get(name) is not None:
            out[field] = options[name]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise FieldError("format", "must be \"json\" or a JSON schema")
    if body.get("tools"):
        out["tools"] = body["tools"]
    return out


class Ollama:
    """The dialect of `/api/chat` (chat) and `/api/generate` (not chat)."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat

    def parse(self, body: Any, engine: Any) -> Request:
        try:
            openai_body = to_openai(body, self.chat)
            req = from_openai(openai_body, chat="messages" in openai_body,
                              context=engine.context, tokenizer=engine.tokenizer)
        except FieldError as e:
            raise renamed(e, PARAMS) from None
        req.max_tokens_param = "options.num_predict"
        return req

    def output(self, req: Request, model: str, tokenizer: Any) -> OllamaOutput:
        return OllamaOutput(req, model, self.chat)

    @staticmethod
    def error(e: RequestError) -> Response:
        return error_response(e)


class OllamaOutput:
    """Engine chunks as Ollama's answer: one object, or NDJSON lines ending with `done`."""

    media_type = "application/x-ndjson"

    def __init__(self, req: Request, model: str, chat: bool) -> None:
        self.req, self.model, self.chat = req, model, chat
        self.tools = req.tools if req.tools is not None and req.tools.active else None
        self.t0 = time.perf_counter()

    def _piece(self, text: str, tool_calls: list[dict] | None = None) -> dict:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                out["message"]["tool_calls"] = [{"function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"]["arguments"])}} for c in tool_calls]
        else:
            out["response"] = text
        out["done"] = False
        return out

    def _done(self, last: Chunk, text: str = "", calls: list[dict] | None = None) -> dict:
        u = last.usage or inference_pb2.Usage()
        total = int((time.perf_counter() - self.t0) * 1e9)
        ttft = int(u.time_to_first_token_seconds * 1e9)
        return {**self._piece(text, calls), "done": True,
                "done_reason": "length" if last.finish_reason ==
                inference_pb2.FINISH_REASON_LENGTH else "stop",
                "total_duration": total, "load_duration": 0,
                "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": ttft,
                "eval_count": u.completion_tokens, "eval_duration": max(0, total - ttft)}

    def _final(self, text: str, last: Chunk) -> dict:
        if self.tools is None:
            return self._done(last, text)
        message, _ = self.tools.message(text, "stop" if last.finish_reason !=
                                        inference_pb2.FINISH_REASON_LENGTH else "length")
        return self._done(last, message["content"] or "", message.get("tool_calls"))

    def whole(self, chunks: list[Chunk]) -> dict:
        return self._final("".join(c.text for c in chunks), chunks[-1])

    async def events(self, first: Chunk, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        held: list[Chunk] = []
        chunk = first
        try:
            while True:
                held.append(chunk)
                if self.tools is None and chunk.text and not chunk.finish_reason:
                    yield json.dumps(self._piece(chunk.text)) + "\n"
                if chunk.finish_reason:
                    break
                chunk = await anext(chunks)
        except RequestError as e:
            yield json.dumps({"error": e.message}) + "\n"
            return
        tail = chunk.text if self.tools is None else "".join(c.text for c in held)
        yield json.dumps(self._final(tail, chunk)) + "\n"


def _details(model: Any) -> dict:
    return {"format": "mlx", "family": model.model_type, "families": [model.model_type],
            "parameter_size": f"{model.weight_bytes / 1e9:.1f}GB of weights",
            "quantization_level": "", "parent_model": ""}


def tags(model: Any) -> dict:
    """`/api/tags` and `/api/ps`: the one served model."""
    modified = datetime.fromtimestamp(model.path.stat().st_mtime, UTC).isoformat()
    return {"models": [{"name": model.model_id, "model": model.model_id,
                        "modified_at": modified, "size": model.weight_bytes,
                        "digest": "", "details": _details(model),
                        "expires_at": "9999-12-31T00:00:00Z", "size_vram": model.weight_bytes}]}


def show(model: Any, tokenizer: Any) -> dict:
    """`/api/show` of the served model."""
    template = getattr(tokenizer, "chat_template", None) or ""
    caps = ["completion"] + (["tools"] if getattr(tokenizer, "has_tool_calling", False) else [])
    return {"modelfile": f"FROM {model.model_id}\n", "parameters": "", "template": template,
            "details": _details(model), "capabilities": caps,
            "model_info": {"general.architecture": model.model_type,
                           "general.block_count": model.num_layers}}


def routes(http: Any) -> list[Route]:
    """The Ollama routes of an HttpApi (`http.complete` runs the generations)."""
    source = http.source

    async def chat(request: Any) -> Response:
        return await http.complete(request, Ollama(chat=True))

    async def generate(request: Any) -> Response:
        return await http.complete(request, Ollama(chat=False))

    async def listing(request: Any) -> Response:
        return JSONResponse(tags(source.model))

    async def details(request: Any) -> Response:
        try:
            body = await http.body(request)
            name = bare(str(body.get("model") or body.get("name") or "")) \
                if isinstance(body, dict) else ""
            if name != source.model.model_id:
                raise model_not_found(name, source.model.model_id)
        except RequestError as e:
            return error_response(e)
        return JSONResponse(show(source.model, getattr(source.engine, "tokenizer", None)))

    async def version(request: Any) -> Response:
        return JSONResponse({"version": VERSION})

    return [Route("/api/chat", http.guard(chat), methods=["POST"]),
            Route("/api/generate", http.guard(generate), methods=["POST"]),
            Route("/api/tags", http.guard(listing), methods=["GET"]),
            Route("/api/ps", http.guard(listing), methods=["GET"]),
            Route("/api/show", http.guard(details), methods=["POST"]),
            Route("/api/version", version, methods=["GET"])]
