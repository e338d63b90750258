"""Structured output: a request's JSON schema, regex, choice or Lark grammar as one llguidance
grammar, checked before any work starts (docs/structured.md).

The grammar travels to the last stage with the sequence's first chunk; the stage masks every
token the grammar does not allow (worker/constrain.py). This module only builds and checks it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from protos import inference_pb2

# SamplingParams' structured output fields, at most one per request.
FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON without free whitespace: a model cannot pad an object with spaces until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CHOICES = 1024


class GrammarError(ValueError):
    """Structured output llguidance cannot compile; `field` names the SamplingParams field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def chosen(params: inference_pb2.SamplingParams) -> str | None:
    """The structured output field set in `params` (None: free text); GrammarError when more
    than one is."""
    fields = [f for f in FIELDS if (f == "choice" and params.choice)
              or (f == "json_object" and params.json_object)
              or (f not in ("choice", "json_object") and params.HasField(f))]
    if len(fields) > 1:
        raise GrammarError(fields[1], f"cannot be combined with {fields[0]}; set one of "
                           f"{', '.join(FIELDS)}")
    return fields[0] if fields else None


def grammar_of(params: inference_pb2.SamplingParams) -> str:
    """The llguidance grammar of `params`' structured output ("" for free text), checked;
    GrammarError naming the field when it cannot be compiled."""
    field = chosen(params)
    if field is None:
        return ""
    if field == "json_object":
        value: Any = True
    elif field == "choice":
        value = tuple(params.choice)
    else:
        value = getattr(params, field)
    return _compiled(field, value)


@lru_cache(maxsize=256)
def _compiled(field: str, value: Any) -> str:
    from llguidance import LLMatcher

    if field == "json_object":
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif field == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise GrammarError(field, f"is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(field, "must be a JSON schema (an object)")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(field, f"cannot be compiled: {e}") from None
    elif field == "regex":
        grammar = LLMatcher.grammar_from_regex(value)
    elif field == "choice":
        if len(value) > MAX_CHOICES:
            raise GrammarError(field, f"may hold at most {MAX_CHOICES} strings, got {len(value)}")
        if not all(value):
            raise GrammarError(field, "holds an empty string")
        # Lark string literals take JSON's escapes
        grammar = LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    else:
        grammar = LLMatcher.grammar_from_lark(value)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(field, f"cannot be compiled: {error.strip()}")
    return grammar


def set_schema(params: inference_pb2.SamplingParams, schema: Any) -> None:
    """Constrain `params` to a JSON schema given as a Python value."""
    params.json_schema = json.dumps(schema)


# vLLM's names for structured output in a request body, and the SamplingParams field of each
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice",
                      "grammar": "grammar"}


def _put(params: inference_pb2.SamplingParams, field: str, value: Any, param: str) -> None:
    if field == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise GrammarError(param, f"is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise GrammarError(param, "must be a JSON schema (an object)")
        set_schema(params, value)
    elif field == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise GrammarError(param, "must be a non-empty list of strings")
        params.choice.extend(value)
    else:
        if not isinstance(value, str) or not value:
            raise GrammarError(param, "must be a non-empty string")
        setattr(params, field, value)


def from_body(body: dict, params: inference_pb2.SamplingParams) -> str | None:
    """Set `params`' structured output from an OpenAI body: `response_format` (json_object,
    json_schema), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
    or `structured_outputs`. Returns the body field that set it; GrammarError naming it."""
    found: list[str] = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise GrammarError("response_format", "must be an object with a type")
        kind = fmt.get("type")
        if kind == "json_object":
            params.json_object = True
            found.append("response_format")
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GrammarError("response_format", "json_schema must be an object with "
                                   "name and schema")
            _put(params, "json_schema", spec["schema"], "response_format")
            found.append("response_format")
        elif kind not in (None, "text"):
            raise GrammarError("response_format", f"type {kind!r} is not one of text, "
                               "json_object, json_schema")
    for name, field in GUIDED.items():
        if body.get(name) is not None:
            _put(params, field, body[name], name)
            found.append(name)
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise GrammarError("structured_outputs", "must be an object")
        for name, field in STRUCTURED_OUTPUTS.items():
            if outputs.get(name) is not None:
                _put(params, field, outputs[name], f"structured_outputs.{name}")
                found.append(f"structured_outputs.{name}")
    if len(found) > 1:
        raise GrammarError(found[1], f"cannot be combined with {found[0]}")
    return found[0] if found else None
