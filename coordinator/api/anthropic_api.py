"""Anthropic's Messages API (`POST /v1/messages`) as a dialect of the HTTP API.

A thin translation: the body becomes an OpenAI chat body, checked by the one request path
(coordinator/api/requests.py), with errors naming the fields as Anthropic names them; the engine's
chunks become a message, or Anthropic's server-sent events. Tools map to the OpenAI tool-call
machinery (coordinator/api/tools.py): `tool_use` blocks out, `tool_result` blocks in.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from coordinator.api.requests import FieldError, Request, from_openai, renamed, retry_after
from coordinator.serving.engine import Chunk, RequestError
from protos import inference_pb2

STOP_REASON = {inference_pb2.FINISH_REASON_STOP: "end_turn",
               inference_pb2.FINISH_REASON_LENGTH: "max_tokens",
               inference_pb2.FINISH_REASON_CANCELLED: "end_turn"}
ERRORS = {"INVALID_ARGUMENT": (400, "invalid_request_error"),
          "UNAUTHENTICATED": (401, "authentication_error"),
          "NOT_FOUND": (404, "not_found_error"),
          "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
          "UNAVAILABLE": (529, "overloaded_error"),
          "DEADLINE_EXCEEDED": (504, "api_error")}
# OpenAI body names in errors -> Anthropic's
PARAMS = {"stop": "stop_sequences", "max_tokens": "max_tokens", "tool_choice": "tool_choice"}


def error_response(e: RequestError) -> Response:
    status, kind = ERRORS.get(e.code, (500, "api_error"))
    return JSONResponse({"type": "error", "error": {"type": kind, "message": e.message}},
                        status, headers=retry_after(e.code))


def _text(block: Any, where: str) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, list):
        return "".join(_text(b, f"{where}[{i}]") for i, b in enumerate(block))
    if isinstance(block, dict) and block.get("type") == "text" and isinstance(
            block.get("text"), str):
        return block["text"]
    raise FieldError(where, "must be text: a string or text blocks")


def _message(m: Any, i: int) -> list[dict]:
    """One Anthropic message as OpenAI chat messages (tool results become `tool` messages)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise FieldError(f"{where}.role", "must be user or assistant")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": m["role"], "content": content}]
    if not isinstance(content, list):
        raise FieldError(f"{where}.content", "must be a string or a list of content blocks")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use" and m["role"] == "assistant":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and m["role"] == "user":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(block.get("content", ""), f"{at}.content")})
        else:
            raise FieldError(f"{at}.type", f"{kind!r} is not supported here (text, tool_use "
                             "in assistant messages, tool_result in user messages)")
    out: list[dict] = list(results)
    if texts or calls or not results:
        msg: dict[str, Any] = {"role": m["role"], "content": "".join(texts) or None}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def to_openai(body: Any) -> dict:
    """The OpenAI chat body that asks for the same as an Anthropic Messages body."""
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    if body.get("max_tokens") is None:
        raise FieldError("max_tokens", "is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "must be a non-empty list")
    chat: list[dict] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _text(body["system"], "system")})
    for i, m in enumerate(messages):
        chat += _message(m, i)
    out: dict[str, Any] = {"messages": chat, "max_tokens": body["max_tokens"],
                           "stream": body.get("stream", False)}
    for name in ("model", "temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise FieldError("tools", "must be a list")
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema")}} if isinstance(t, dict) else t
            for t in body["tools"]]
        choice = body.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none"):
            out["tool_choice"] = kind
        elif kind == "any":
            out["tool_choice"] = "required"
        else:
            raise FieldError("tool_choice", "must be {'type': auto | any | tool | none}")
        if isinstance(choice, dict) and choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


class Messages:
    """The dialect of `/v1/messages`."""

    def parse(self, body: Any, engine: Any) -> Request:
        try:
            return from_openai(to_openai(body), chat=True, context=engine.context,
                               tokenizer=engine.tokenizer)
        except FieldError as e:
            raise renamed(e, PARAMS) from None

    def output(self, req: Request, model: str, tokenizer: Any) -> MessageOutput:
        return MessageOutput(req, model)

    @staticmethod
    def error(e: RequestError) -> Response:
        return error_response(e)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class MessageOutput:
    """Engine chunks as an Anthropic message, whole or as its stream of events."""

    def __init__(self, req: Request, model: str) -> None:
        self.req, self.model = req, model
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.tools = req.tools if req.tools is not None and req.tools.active else None

    def _content(self, text: str, finish: int) -> tuple[list[dict], str]:
        reason = STOP_REASON.get(finish, "end_turn")
        if self.tools is None:
            return [{"type": "text", "text": text}], reason
        message, why = self.tools.message(text, "stop" if reason == "end_turn" else "length")
        blocks = [{"type": "text", "text": message["content"]}] if message["content"] else []
        for call in message.get("tool_calls", []):
            blocks.append({"type": "tool_use", "id": call["id"].replace("call_", "toolu_"),
                           "name": call["function"]["name"],
                           "input": json.loads(call["function"]["arguments"])})
        return blocks, "tool_use" if why == "tool_calls" else reason

    def _usage(self, last: Chunk) -> dict:
        u = last.usage or inference_pb2.Usage()
        return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}

    def _head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": None, "stop_sequence": None}

    def whole(self, chunks: list[Chunk]) -> dict:
        last = chunks[-1]
        content, reason = self._content("".join(c.text for c in chunks), last.finish_reason)
        return {**self._head(), "content": content, "stop_reason": reason,
                "usage": self._usage(last)}

    async def events(self, first: Chunk, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        """message_start, the content blocks (text streamed as it comes; with tools, the
        blocks when the output ends), message_delta with the stop reason, message_stop."""
        head = self._head()
        head["usage"] = {"input_tokens": 0, "output_tokens": 0}
        yield _sse("message_start", {"type": "message_start", "message": head})
        streaming_text = self.tools is None
        if streaming_text:
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
        held: list[Chunk] = []
        chunk = first
        try:
            while True:
                held.append(chunk)
                if streaming_text and chunk.text:
                    yield _sse("content_block_delta", {
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": chunk.text}})
                if chunk.finish_reason:
                    break
                chunk = await anext(chunks)
        except RequestError as e:
            _, kind = ERRORS.get(e.code, (500, "api_error"))
            yield _sse("error", {"type": "error", "error": {"type": kind, "message": e.message}})
            return
        text = "".join(c.text for c in held)
        blocks, reason = self._content(text, chunk.finish_reason)
        if streaming_text:
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        else:
            for i, block in enumerate(blocks):
                start = {**block, "input": {}} if block["type"] == "tool_use" else \
                    {"type": "text", "text": ""}
                yield _sse("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": start})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(
                    block["input"])} if block["type"] == "tool_use" else \
                    {"type": "text_delta", "text": block["text"]}
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": delta})
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": i})
        yield _sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": reason, "stop_sequence": None},
                                     "usage": {"output_tokens": self._usage(chunk)[
                                         "output_tokens"]}})
        yield _sse("message_stop", {"type": "message_stop"})
