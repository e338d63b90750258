"""Tool calls on chat completions: `tools` and `tool_choice` in, `message.tool_calls` out
(docs/structured.md).

The tool definitions go through the model's chat template. With `tool_choice: "required"` the
output is constrained to a JSON array of `{"name", "parameters"}` objects, one of the tools'
names and its parameter schema each; with a named function, to that function's parameters. With
`"auto"` the model writes its own tool-call format, which mlx-lm's parser for the model reads.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator.api.structured import GrammarError, set_schema
from protos import inference_pb2

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Tools:
    """A request's tools and how it may call them."""

    tools: list[dict]  # OpenAI tool objects, checked
    choice: str = "auto"  # auto, none, required, or "function"
    name: str = ""  # the function tool_choice names
    parser: Any = None  # mlx-lm's tool parser of the model (for auto)
    markers: tuple[str, str] | None = None  # the model's tool-call start and end
    parallel: bool = True  # parallel_tool_calls: false allows one call only
    ids: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def template_tools(self) -> list[dict] | None:
        """What the chat template gets (`tools=`): none when the model may not call them."""
        return self.tools if self.active else None

    def parameters(self, name: str) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or EMPTY_PARAMETERS
        raise KeyError(name)

    def constrain(self, params: inference_pb2.SamplingParams) -> None:
        """Constrain the output for `required` and a named function."""
        if self.choice == "function":
            set_schema(params, self.parameters(self.name))
        elif self.choice == "required":
            calls = [{"type": "object", "additionalProperties": False,
                      "properties": {"name": {"const": t["function"]["name"]},
                                     "parameters": self.parameters(t["function"]["name"])},
                      "required": ["name", "parameters"]} for t in self.tools]
            schema = {"type": "array", "minItems": 1,
                      "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            set_schema(params, schema)

    # -- the answer ----------------------------------------------------------------------------
    def _call(self, name: str, arguments: Any) -> dict:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.ids.append(call_id)
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        return {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished output."""
        if self.choice == "function":
            return None, [self._call(self.name, text)]
        if self.choice == "required":
            try:
                calls = json.loads(text)
            except ValueError:
                return text, []  # cut by max_tokens: a valid prefix, no call
            return None, [self._call(c["name"], c["parameters"]) for c in calls]
        if self.choice != "auto" or self.parser is None or self.markers is None:
            return text, []
        start, end = self.markers
        content, calls, rest = [], [], text
        while start in rest:
            before, _, after = rest.partition(start)
            content.append(before)
            body, _, rest = after.partition(end)
            try:
                parsed = self.parser(body.strip(), self.tools)
            except Exception:  # noqa: BLE001 - not a call the parser reads: keep it as text
                content.append(start + body + end)
                continue
            for one in parsed if isinstance(parsed, list) else [parsed]:
                calls.append(self._call(one["name"], one.get("arguments", {})))
        content.append(rest)
        joined = "".join(content).strip()
        return (joined or None) if calls else text, calls

    def message(self, text: str, finish: str) -> tuple[dict, str]:
        """The chat message of a finished output and its finish_reason."""
        content, calls = self.parse(text) if finish == "stop" else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls"
        return message, finish

    @staticmethod
    def deltas(calls: list[dict]) -> list[dict]:
        """The streamed form of tool calls: one `delta.tool_calls` entry each, with index."""
        return [{"index": i, **c} for i, c in enumerate(calls)]


def _tool(value: Any, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type") != "function" \
            or not isinstance(value.get("function"), dict):
        raise GrammarError(where, "must be {'type': 'function', 'function': {...}}")
    fn = value["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise GrammarError(f"{where}.function.name", "must be 1 to 64 letters, digits, _ . -")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise GrammarError(f"{where}.function.parameters", "must be a JSON schema (an object)")
    return {"type": "function", "function": {k: v for k, v in fn.items()
                                             if k in ("name", "description", "parameters")}}


def from_body(body: dict, tokenizer: Any) -> Tools | None:
    """The request's tools (None without any); GrammarError naming the field at fault."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if not raw:
        if choice not in (None, "none", "auto"):
            raise GrammarError("tool_choice", "needs tools")
        return None
    if not isinstance(raw, list):
        raise GrammarError("tools", "must be a list of function tools")
    tools = [_tool(t, i) for i, t in enumerate(raw)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise GrammarError("tools", "holds two functions of the same name")
    out = Tools(tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise GrammarError("parallel_tool_calls", "must be true or false")
    out.parallel = parallel is not False
    if tokenizer is not None and getattr(tokenizer, "has_tool_calling", False):
        out.parser = tokenizer.tool_parser
        out.markers = (tokenizer.tool_call_start, tokenizer.tool_call_end)
    if choice is None or choice in ("auto", "none", "required"):
        out.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise GrammarError("tool_choice", f"names {name!r}, which is not one of the tools "
                               f"({', '.join(names)})")
        out.choice, out.name = "function", name
    else:
        raise GrammarError("tool_choice", "must be none, auto, required or "
                           "{'type': 'function', 'function': {'name': ...}}")
    return out
