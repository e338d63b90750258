"""OpenAI's Responses API (`POST /v1/responses`) as a dialect of the HTTP API.

A thin translation, as coordinator/api/anthropic_api.py: `input` (text or items), `instructions`,
`max_output_tokens`, `text.format` and function `tools` become an OpenAI chat body checked by the
one request path (coordinator/api/requests.py), with errors naming the Responses fields; the
engine's chunks become a response object or the Responses stream of events. Tool calls are
`function_call` items out and `function_call_output` items in (coordinator/api/tools.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from coordinator.api.requests import FieldError, Request, from_openai, renamed
from coordinator.serving.engine import Chunk, RequestError
from protos import inference_pb2

# chat body names in errors -> the Responses API's
PARAMS = {"max_tokens": "max_output_tokens", "messages": "input",
          "response_format": "text.format"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                    "input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                raise FieldError(f"{where}[{i}]", "must be a text part (input_text)")
            parts.append(part["text"])
        return "".join(parts)
    raise FieldError(where, "must be a string or a list of text parts")


def _items(value: Any) -> list[dict]:
    """`input` as chat messages: messages, function calls and their outputs."""
    if isinstance(value, str):
        if not value:
            raise FieldError("input", "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise FieldError("input", "must be a string or a non-empty list of items")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise FieldError(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"),
                        "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"),
                                 "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise FieldError(f"{where}.type", f"{kind!r} is not supported (message, "
                             "function_call, function_call_output)")
    return out


def to_chat(body: Any) -> dict:
    """The chat completions body that asks for the same as a Responses body."""
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    if body.get("input") is None:
        raise FieldError("input", "is required")
    messages = _items(body["input"])
    if body.get("instructions") is not None:
        messages.insert(0, {"role": "system",
                            "content": _text(body["instructions"], "instructions")})
    out: dict[str, Any] = {"messages": messages, "stream": body.get("stream", False)}
    for name in ("model", "temperature", "top_p", "top_k", "seed", "parallel_tool_calls"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema"),
            "strict": fmt.get("strict", True)}}
    elif fmt is not None:
        out["response_format"] = fmt
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise FieldError("tools", "must be a list")
        out["tools"] = [{"type": "function", "function": {
            k: t.get(k) for k in ("name", "description", "parameters") if t.get(k) is not None}}
            if isinstance(t, dict) and t.get("type") == "function" else t
            for t in body["tools"]]
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "function":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice is not None:
            out["tool_choice"] = choice
    return out


class Responses:
    """The dialect of `/v1/responses`."""

    def parse(self, body: Any, engine: Any) -> Request:
        try:
            req = from_openai(to_chat(body), chat=True, context=engine.context,
                              tokenizer=engine.tokenizer)
        except FieldError as e:
            raise renamed(e, PARAMS) from None
        req.max_tokens_param = "max_output_tokens"
        return req

    def output(self, req: Request, model: str, tokenizer: Any) -> ResponseOutput:
        return ResponseOutput(req, model)

    @staticmethod
    def error(e: RequestError) -> Response:
        from coordinator.api.http_api import request_error

        return request_error(e)


def _sse(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class ResponseOutput:
    """Engine chunks as a response object, whole or as the Responses events."""

    def __init__(self, req: Request, model: str) -> None:
        self.req, self.model = req, model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tools = req.tools if req.tools is not None and req.tools.active else None
        self.seq = 0

    def _response(self, status: str, output: list[dict], last: Chunk | None) -> dict:
        u = (last.usage if last is not None else None) or inference_pb2.Usage()
        incomplete = last is not None and last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "model": self.model, "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                      "total_tokens": u.prompt_tokens + u.completion_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}} if last else None,
        }

    def _message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def _output(self, text: str, finish: int) -> list[dict]:
        if self.tools is None:
            return [self._message(text)]
        stopped = finish != inference_pb2.FINISH_REASON_LENGTH
        message, _ = self.tools.message(text, "stop" if stopped else "length")
        items = [self._message(message["content"])] if message["content"] else []
        for call in message.get("tool_calls", []):
            items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                          "call_id": call["id"], "name": call["function"]["name"],
                          "arguments": call["function"]["arguments"], "status": "completed"})
        return items

    def whole(self, chunks: list[Chunk]) -> dict:
        last = chunks[-1]
        return self._response("completed",
                              self._output("".join(c.text for c in chunks), last.finish_reason),
                              last)

    def _event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return _sse({"type": kind, "sequence_number": self.seq - 1, **fields})

    async def events(self, first: Chunk, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        """created, in_progress; the message's text as deltas (with tools, the items when the
        output ends); completed (or incomplete) with the whole response."""
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress",
                          response=self._response("in_progress", [], None))
        streaming_text = self.tools is None
        ids = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        if streaming_text:
            yield self._event("response.output_item.added", output_index=0,
                              item={**self._message("", "in_progress"), "content": []})
            yield self._event("response.content_part.added", item_id=self.message_id,
                              output_index=0, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": []})
        held: list[Chunk] = []
        chunk = first
        try:
            while True:
                held.append(chunk)
                if streaming_text and chunk.text:
                    yield self._event("response.output_text.delta", delta=chunk.text, **ids)
                if chunk.finish_reason:
                    break
                chunk = await anext(chunks)
        except RequestError as e:
            yield self._event("error", code=e.code.lower(), message=e.message, param=e.param)
            return
        text = "".join(c.text for c in held)
        output = self._output(text, chunk.finish_reason)
        if streaming_text:
            yield self._event("response.output_text.done", text=text, **ids)
            yield self._event("response.content_part.done", item_id=self.message_id,
                              output_index=0, content_index=0,
                              part={"type": "output_text", "text": text, "annotations": []})
            yield self._event("response.output_item.done", output_index=0, item=output[0])
        else:
            for i, item in enumerate(output):
                yield self._event("response.output_item.added", output_index=i,
                                  item={**item, "status": "in_progress"})
                if item["type"] == "function_call":
                    yield self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=i,
                                      delta=item["arguments"])
                    yield self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=i,
                                      arguments=item["arguments"])
                yield self._event("response.output_item.done", output_index=i, item=item)
        final = self._response("completed", output, chunk)
        yield self._event(f"response.{final['status']}", response=final)
