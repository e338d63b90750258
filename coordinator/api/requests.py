"""Request validation shared by the gRPC and HTTP APIs: one checked form, field-naming errors."""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.api import structured, tools
from coordinator.api.structured import GrammarError
from coordinator.serving.engine import DEFAULT_MAX_TOKENS, Engine, RequestError
from protos import inference_pb2

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
INT32_MAX = (1 << 31) - 1


class FieldError(RequestError):
    """A bad value in one request field; `param` names it (OpenAI's `error.param`)."""

    def __init__(self, param: str, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(code, f"{param} {message}", param)


def renamed(e: FieldError, names: dict[str, str]) -> FieldError:
    """`e` with its field named as another API names it (`names`: OpenAI body field -> that
    API's), for the dialects that translate their bodies into an OpenAI one."""
    param = e.param or ""
    base = re.split(r"[.\[]", param, maxsplit=1)[0]
    named = names.get(base, base) + param[len(base):]
    text = e.message[len(param):].lstrip() if e.message.startswith(param) else e.message
    return FieldError(named, text)


def retry_after(code: str) -> dict[str, str]:
    """HTTP headers of a refusal: a full queue (429) asks the client to come back in a second."""
    return {"Retry-After": "1"} if code == "RESOURCE_EXHAUSTED" else {}


def model_not_found(model: str, served: str) -> FieldError:
    return FieldError("model", f"{model!r} is not served here; this cluster serves {served!r}",
                      code="NOT_FOUND")


@dataclass
class Request:
    """One validated generation request, from either API."""

    model: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None  # chat template messages
    sampling: inference_pb2.SamplingParams = field(default_factory=inference_pb2.SamplingParams)
    stream: bool = False
    include_usage: bool = False
    max_tokens_param: str = "max_tokens"  # or max_completion_tokens, as the client sent it
    logprobs: bool = False
    top_logprobs: int = 0
    tools: tools.Tools | None = None


# -- sampling -----------------------------------------------------------------------------------
def check_sampling(params: inference_pb2.SamplingParams, *, context: int | None = None,
                   prefix: str = "") -> inference_pb2.SamplingParams:
    """Validate SamplingParams; return a copy with a fresh seed when sampling is random.

    Errors name the field as `prefix + name` (`sampling.temperature` on gRPC).
    """
    p = inference_pb2.SamplingParams()
    p.CopyFrom(params)

    def bad(name: str, message: str) -> FieldError:
        return FieldError(prefix + name, message)

    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if p.HasField(name) and not math.isfinite(getattr(p, name)):
            raise bad(name, f"must be a finite number, got {getattr(p, name)}")
    if p.HasField("temperature") and p.temperature < 0:
        raise bad("temperature", f"must be >= 0 (0 is greedy), got {p.temperature:g}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {p.top_p:g}")
    if p.HasField("top_k"):
        if p.top_k < -1:
            raise bad("top_k", f"must be >= 0 (0 or -1 disables it), got {p.top_k}")
        if p.top_k == -1:
            p.top_k = 0
    if p.HasField("min_p") and not 0 <= p.min_p <= 1:
        raise bad("min_p", f"must be in [0, 1], got {p.min_p:g}")
    if p.HasField("repetition_penalty") and p.repetition_penalty <= 0:
        raise bad("repetition_penalty", f"must be > 0 (1 disables it), got "
                  f"{p.repetition_penalty:g}")
    if p.HasField("max_tokens"):
        if p.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {p.max_tokens}")
        if context is not None and p.max_tokens > context:
            raise bad("max_tokens", f"must be <= {context} (the context), got {p.max_tokens}")
    if len(p.stop) > MAX_STOPS:
        raise bad("stop", f"may hold at most {MAX_STOPS} strings, got {len(p.stop)}")
    for i, stop in enumerate(p.stop):
        if not stop:
            raise bad(f"stop[{i}]", "is empty")
    if p.HasField("logprobs") and not 0 <= p.logprobs <= MAX_TOP_LOGPROBS:
        raise bad("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {p.logprobs}")
    try:
        structured.grammar_of(p)
    except GrammarError as e:
        raise bad(e.field, str(e)) from None
    if not p.HasField("seed") and p.temperature > 0:
        p.seed = secrets.randbits(63)
    return p


def fill_max_tokens(params: inference_pb2.SamplingParams, prompt_tokens: int,
                    context: int) -> inference_pb2.SamplingParams:
    """Unset max_tokens: the default, cut to what is left of the context after the prompt."""
    if not params.HasField("max_tokens") and context - prompt_tokens >= 1:
        params.max_tokens = min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
    return params


# -- prompts ------------------------------------------------------------------------------------
def check_messages(messages: Sequence[dict], prefix: str = "") -> None:
    if not messages:
        raise FieldError(prefix + "messages", "is empty; send at least one message")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise FieldError(f"{prefix}messages[{i}].role",
                             f"{m['role']!r} is not one of {', '.join(ROLES)}")


def encode_chat(engine: Engine, messages: Sequence[dict],
                tool_defs: list[dict] | None = None) -> list[int]:
    """Apply the model's chat template, with the tools when there are (plain `role: content`
    lines when it has none)."""
    check_messages(messages)
    chat = [{**m, "role": "system" if m["role"] == "developer" else m["role"]}
            for m in messages]
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None) is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
        return engine.encode_prompt(text)
    extra = {"tools": tool_defs} if tool_defs else {}
    try:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                      **extra)
    except Exception as e:  # jinja raises TemplateError for conversations it refuses
        raise FieldError("messages", f"were refused by the model's chat template: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def check_prompt(engine: Engine, ids: Sequence[int], sampling: inference_pb2.SamplingParams,
                 param: str, max_tokens_param: str) -> None:
    """Refuse a prompt that is empty, out of vocabulary or too long for the context, naming
    the fields as the client sent them (before the default max_tokens is filled in)."""
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
    engine.check(ids, max_tokens, param=param, max_tokens_param=max_tokens_param)


def longest_token(tokenizer: Any) -> int:
    """Characters of the longest entry of the vocabulary (special tokens included): no token
    stands for more text than that. Computed once per tokenizer."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST[key] = max(map(len, vocab), default=0)
    return _LONGEST[key]


_LONGEST: dict[int, int] = {}


def check_prompt_text(engine: Engine, texts: Sequence[Any], param: str) -> None:
    """Refuse, before tokenizing it, text too long for any tokenization of it to fit the
    context: more than context x the longest token's characters (twice that, for normalizers
    that join characters). A prompt of megabytes is refused at once, not tokenized for
    minutes while every other request waits for the tokenizer's thread."""
    longest = longest_token(engine.tokenizer)
    if not longest:
        return
    chars = sum(len(t) for t in texts if isinstance(t, str))
    limit = 2 * engine.context * longest
    if chars > limit:
        raise FieldError(param, f"is {chars} characters; no text over {limit} characters fits "
                         f"the context of {engine.context} tokens")


def prompt_ids(engine: Engine, req: Request) -> list[int]:
    """Tokenize an OpenAI request (prompt, token ids or chat), check it against the engine and
    fill its default max_tokens."""
    if req.messages is not None:
        check_prompt_text(engine, [m.get("content") for m in req.messages], "messages")
    elif not req.prompt_token_ids:
        check_prompt_text(engine, [req.prompt], "prompt")
    if req.messages is not None:
        ids = encode_chat(engine, req.messages,
                          req.tools.template_tools() if req.tools else None)
    elif req.prompt_token_ids:
        ids = list(req.prompt_token_ids)
    else:
        ids = engine.encode_prompt(req.prompt or "")
    check_prompt(engine, ids, req.sampling, "messages" if req.messages is not None else "prompt",
                 req.max_tokens_param)
    fill_max_tokens(req.sampling, len(ids), engine.context)
    return ids


# -- OpenAI bodies ------------------------------------------------------------------------------
def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise FieldError(name, f"must be a number, got {type(v).__name__}")
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(name, f"must be an integer, got {type(v).__name__}")
    return v


def _boolean(body: dict, name: str, prefix: str = "") -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise FieldError(prefix + name, f"must be true or false, got {type(v).__name__}")
    return v


def _unsupported(body: dict) -> None:
    if (n := _integer(body, "n")) is not None and n != 1:
        raise FieldError("n", f"must be 1 (one choice per request), got {n}")
    if (b := _integer(body, "best_of")) is not None and b != 1:
        raise FieldError("best_of", f"must be 1, got {b}")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name):
            raise FieldError(name, "is not supported; use repetition_penalty")
    for name in ("logit_bias", "functions", "suffix"):
        if body.get(name):
            raise FieldError(name, "is not supported by this server")
    if _boolean(body, "echo"):
        raise FieldError("echo", "is not supported by this server")


def _sampling(body: dict, context: int | None) -> inference_pb2.SamplingParams:
    p = inference_pb2.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if (v := _number(body, name)) is not None:
            setattr(p, name, v)
    if (k := _integer(body, "top_k")) is not None:
        if not -1 <= k <= INT32_MAX:
            raise FieldError("top_k", f"must be >= 0 (0 or -1 disables it), got {k}")
        p.top_k = k
    name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    if (m := _integer(body, name)) is not None:
        if m < 1:
            raise FieldError(name, f"must be >= 1, got {m}")
        if m > min(context or INT32_MAX, INT32_MAX):
            raise FieldError(name, f"must be <= {context or INT32_MAX} (the context), got {m}")
        p.max_tokens = m
    if (seed := _integer(body, "seed")) is not None:
        if not -(1 << 63) <= seed < (1 << 64):
            raise FieldError("seed", f"must fit in 64 bits, got {seed}")
        p.seed = seed % (1 << 64)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise FieldError("stop", "must be a string or a list of strings")
        p.stop.extend(stop)
    return check_sampling(p, context=context)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise FieldError(f"{where}[{j}]", "must be a text part {'type': 'text', "
                                 "'text': '...'}; other content types are not supported")
            texts.append(part["text"])
        return "".join(texts)
    raise FieldError(where, f"must be a string or a list of text parts, got "
                     f"{type(value).__name__}")


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls, arguments parsed for the chat template."""
    if not isinstance(value, list):
        raise FieldError(where, "must be a list")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FieldError(f"{where}[{j}]", "must be {'id', 'type': 'function', "
                             "'function': {'name', 'arguments'}}")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise FieldError(f"{where}[{j}].function.arguments",
                                 "is not valid JSON") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args or {}}})
    return out


def _messages(body: dict) -> list[dict]:
    raw = body.get("messages")
    if raw is None:
        raise FieldError("messages", "is required")
    if not isinstance(raw, list):
        raise FieldError("messages", f"must be a list, got {type(raw).__name__}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str):
            raise FieldError(f"messages[{i}].role", "is required (a string)")
        msg = {"role": role, "content": _content(m.get("content"), f"messages[{i}].content")}
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    check_messages(out)
    return out


def _prompt(body: dict, req: Request) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError("prompt", "is empty")
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt_token_ids = list(prompt)
    elif prompt is None:
        raise FieldError("prompt", "is required")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(
            isinstance(t, str | list) for t in prompt):
        raise FieldError("prompt", f"holds {len(prompt)} prompts; send one per request")
    else:
        raise FieldError("prompt", "must be a string or a list of token ids")


def _structured(body: dict, req: Request, chat: bool, tokenizer: Any) -> None:
    """Structured output and tools of an OpenAI body into `req`, compiled and checked."""
    try:
        param = structured.from_body(body, req.sampling)
        if chat:
            req.tools = tools.from_body(body, tokenizer)
        elif body.get("tools"):
            raise GrammarError("tools", "are only for chat completions")
        if req.tools is not None and req.tools.choice in ("required", "function"):
            if param is not None:
                raise GrammarError("tool_choice", f"cannot be combined with {param}")
            req.tools.constrain(req.sampling)
            param = "tool_choice"
    except GrammarError as e:
        raise FieldError(e.field, str(e)) from None
    try:
        structured.grammar_of(req.sampling)
    except GrammarError as e:
        raise FieldError(param or e.field, str(e)) from None


def from_openai(body: Any, *, chat: bool, context: int | None = None,
                tokenizer: Any = None) -> Request:
    """Check an OpenAI chat or completions body; every error names the offending field."""
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise FieldError("model", f"must be a string, got {type(model).__name__}")
    _unsupported(body)
    req = Request(model=model or "", stream=_boolean(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise FieldError("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise FieldError("stream_options", "must be an object")
        req.include_usage = _boolean(options, "include_usage", "stream_options.")
    if chat:
        req.messages = _messages(body)
        req.logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise FieldError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        if top and not req.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        req.top_logprobs = top or 0
    else:
        _prompt(body, req)
        top = _integer(body, "logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise FieldError("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        req.logprobs, req.top_logprobs = top is not None, top or 0
    req.sampling = _sampling(body, context)
    _structured(body, req, chat, tokenizer)
    if body.get("max_completion_tokens") is not None:
        req.max_tokens_param = "max_completion_tokens"
    if req.logprobs:
        req.sampling.logprobs = req.top_logprobs
    return req
