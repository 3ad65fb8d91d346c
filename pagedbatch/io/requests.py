"""Turning an input record into a request, or into a row error that says why not.

Values are type-checked here and range-checked later by ``SamplingParams``,
so the job can report every bad row with its index, id, field and problem
instead of failing on the first.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from ..structured_output import StructuredOutputError, StructuredOutputParams
from .readers import InputRecord

if TYPE_CHECKING:
    from .templates import PromptTemplate

SAMPLING_FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "logprobs", "n",
)
_INT_FIELDS = frozenset({"max_tokens", "min_tokens", "top_k", "seed", "logprobs", "n"})
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"})
_OPENAI_URLS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


@dataclass
class FieldNames:
    """Which input columns hold the prompt (one of three kinds) and the id."""

    prompt: str = "prompt"
    messages: str = "messages"
    prompt_token_ids: str = "prompt_token_ids"
    id: str = "id"


@dataclass
class ParsedRequest:
    """A valid request: exactly one of ``prompt``, ``messages`` and
    ``prompt_token_ids`` is set; ``sampling`` holds per-row overrides (a
    ``response_format`` becomes ``sampling["structured_output"]``);
    ``source``: the input field the prompt came from, or "template";
    ``sampling_fields``: the field each ``sampling`` value was written in
    where that is not its own name (``body.temperature``; an OpenAI chat's
    ``body.top_logprobs`` is ``logprobs``), for the messages of values the
    sampling checks refuse."""

    index: int
    id: str
    prompt: Optional[str]
    messages: Optional[list[dict]]
    prompt_token_ids: Optional[list[int]]
    sampling: dict
    source: str = "prompt"
    sampling_fields: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)


@dataclass
class RowError:
    """A row that cannot run, with a message naming the field and the problem.
    ``carried``: the input columns its result row keeps (--keep-columns)."""

    index: int
    id: str
    error: str
    carried: Optional[dict] = None


class _Bad(Exception):
    """A row problem; becomes a RowError."""


def parse_record(rec: InputRecord, fields: FieldNames = FieldNames(), fmt: str = "jsonl", *,
                 template: Optional[PromptTemplate] = None,
                 system_prompt: Optional[str] = None) -> Union[ParsedRequest, RowError]:
    """Validate one record and turn it into a ``ParsedRequest``, or a
    ``RowError`` naming the field and the problem. ``fmt`` is the input format
    (``"openai"`` reads an OpenAI batch request; ``"csv"`` decodes the string
    cells: numbers, booleans and JSON lists).

    ``template``: the prompt is rendered from the record's fields (its prompt
    columns are not read). ``system_prompt``: a text prompt becomes chat
    messages [system, user]; chat messages get it first unless they already
    start with a system message. Neither applies to OpenAI batch requests."""
    default_id = str(rec.index)
    if rec.error is not None or rec.data is None:
        return RowError(rec.index, default_id, rec.error or "the row could not be read")
    data = rec.data
    if fmt == "openai":
        return _parse_openai(rec.index, data)
    try:
        row_id = _row_id(data, fields.id, default_id)
    except _Bad as e:
        return RowError(rec.index, default_id, str(e))
    try:
        csv = fmt == "csv"
        if template is not None:
            request = ParsedRequest(rec.index, row_id, _render(template, data), None, None, {}, "template")
        else:
            kind, value = _pick_prompt(
                data,
                {"prompt": fields.prompt, "messages": fields.messages, "prompt_token_ids": fields.prompt_token_ids},
            )
            request = _make_request(rec.index, row_id, kind, value, getattr(fields, kind))
        if system_prompt is not None:
            _add_system_prompt(request, system_prompt, fields.prompt_token_ids)
        for name in SAMPLING_FIELDS:
            if not _absent(data.get(name)):
                request.sampling[name] = _check_sampling(name, data[name], name, csv)
        if not _absent(data.get("response_format")):
            # Parquet structs carry every row's keys, null where absent: drop those.
            request.sampling["structured_output"] = _response_format(
                data["response_format"], "response_format", drop_nulls=fmt not in ("jsonl", "csv"))
        return request
    except _Bad as e:
        return RowError(rec.index, row_id, str(e))


# --- the three kinds of prompt ---------------------------------------------


def _pick_prompt(data: dict, columns: dict[str, str]) -> tuple[str, Any]:
    given = [(kind, data[col]) for kind, col in columns.items() if not _absent(data.get(col))]
    if not given:
        looked = ", ".join(repr(col) for col in columns.values())
        present = ", ".join(repr(k) for k in list(data)[:20]) or "none"
        raise _Bad(f"missing prompt: none of the fields {looked} has a value (fields in the row: {present})")
    if len(given) > 1:
        both = " and ".join(repr(columns[kind]) for kind, _ in given)
        raise _Bad(f"both {both} are given; give exactly one")
    return given[0]


def _make_request(index: int, row_id: str, kind: str, value: Any, field: str) -> ParsedRequest:
    prompt = messages = token_ids = None
    if kind == "prompt":
        prompt = _check_prompt(value, field)
    elif kind == "messages":
        messages = _check_messages(_maybe_json(value, field), field)
    else:
        token_ids = _check_token_ids(_maybe_json(value, field), field)
    return ParsedRequest(index, row_id, prompt, messages, token_ids, {}, field)


def _render(template: PromptTemplate, data: dict) -> str:
    from .templates import TemplateFieldError

    try:
        text = template.render(data)
    except TemplateFieldError as e:
        raise _Bad(f"template: {e}") from None
    if not text.strip():
        raise _Bad("template: the rendered prompt is empty")
    return text


def _add_system_prompt(request: ParsedRequest, system_prompt: str, token_ids_field: str) -> None:
    if request.prompt_token_ids is not None:
        raise _Bad(f"field {token_ids_field!r}: --system-prompt needs a text prompt or chat messages, not token ids")
    if request.prompt is not None:
        request.messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": request.prompt}]
        request.prompt = None
    elif request.messages[0]["role"] != "system":
        request.messages = [{"role": "system", "content": system_prompt}, *request.messages]


def _check_prompt(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"field {field!r} must be a string, got {_describe(value)}")
    if value == "":
        raise _Bad(f"field {field!r} is an empty string")
    return value


def _check_messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad(f"field {field!r} must be a non-empty list of {{role, content}} objects, got {_describe(value)}")
    out = []
    for i, message in enumerate(value):
        where = f"field {field!r} message {i}"
        if not isinstance(message, dict):
            raise _Bad(f"{where} must be an object with 'role' and 'content', got {_describe(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise _Bad(f"{where}: 'role' must be a non-empty string, got {_describe(role)}")
        if isinstance(content, (list, tuple)):
            content = _text_parts(content, where)
        if content is None and role == "assistant":
            content = ""  # OpenAI's form of an assistant turn that only called tools (the server's rule too)
        if not isinstance(content, str):
            raise _Bad(f"{where}: 'content' must be a string, got {_describe(content)}"
                       + (" (only an assistant message may leave it out)" if content is None else ""))
        # Columnar inputs give every struct the union of keys: drop the nulls.
        extra = {k: v for k, v in message.items() if k not in ("role", "content") and not _absent(v)}
        out.append({"role": role, "content": content, **extra})
    return out


def _text_parts(parts: Any, where: str) -> str:
    # OpenAI's content-part form; only text parts can go to a text model.
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _Bad(f"{where}: 'content' parts must all be {{'type': 'text', 'text': str}}, got {_describe(part)}")
        texts.append(part["text"])
    return "".join(texts)


def _check_token_ids(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(t) and t >= 0 for t in value):
        raise _Bad(f"field {field!r} must be a non-empty list of non-negative integers, got {_describe(value)}")
    return [int(t) for t in value]


# --- sampling fields --------------------------------------------------------


def _check_sampling(name: str, value: Any, field: str, csv: bool) -> Any:
    if name in _INT_FIELDS:
        return _as_int(value, field, csv)
    if name in _FLOAT_FIELDS:
        return _as_float(value, field, csv)
    if name == "ignore_eos":
        return _as_bool(value, field, csv)
    if name == "stop":
        if csv and isinstance(value, str) and value.startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a stop string that merely starts with "["
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            return list(value)
        raise _Bad(f"field {field!r} must be a string or a list of strings, got {_describe(value)}")
    if name == "stop_token_ids":
        value = _maybe_json(value, field)
        if isinstance(value, (list, tuple)) and all(_is_int(t) for t in value):
            return [int(t) for t in value]
        raise _Bad(f"field {field!r} must be a list of integers, got {_describe(value)}")
    raise AssertionError(f"unhandled sampling field {name}")


def _as_int(value: Any, field: str, csv: bool) -> int:
    if csv and isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
    elif _is_int(value):
        return int(value)
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)  # an integer column with missing cells comes back as float
    raise _Bad(f"field {field!r} must be an integer, got {_describe(value)}")


def _as_float(value: Any, field: str, csv: bool) -> float:
    if csv and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _Bad(f"field {field!r} must be a number, got {_describe(value)}")


def _as_bool(value: Any, field: str, csv: bool) -> bool:
    if isinstance(value, bool):
        return value
    if csv and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    raise _Bad(f"field {field!r} must be a boolean, got {_describe(value)}")


def _response_format(value: Any, field: str, drop_nulls: bool) -> Optional[StructuredOutputParams]:
    # An object, or JSON text of one (a CSV cell, a string column); None for {"type": "text"}.
    value = _maybe_json(value, field)
    if drop_nulls:
        value = _without_nulls(value)
    try:
        return StructuredOutputParams.from_response_format(value, field)
    except StructuredOutputError as e:
        raise _Bad(f"field {e.where!r}: {e.problem}") from None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if not _absent(v)}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(v) for v in value]
    return value


# --- OpenAI batch requests --------------------------------------------------


def _parse_openai(index: int, data: dict) -> Union[ParsedRequest, RowError]:
    default_id = str(index)
    custom_id = data.get("custom_id")
    if isinstance(custom_id, str) and custom_id:
        row_id = custom_id
    elif _is_int(custom_id):
        row_id = str(custom_id)
    else:
        return RowError(index, default_id, f"field 'custom_id' must be a non-empty string, got {_describe(custom_id)}")
    try:
        method = data.get("method", "POST")
        if method != "POST":
            raise _Bad(f"field 'method' must be 'POST', got {_describe(method)}")
        url = data.get("url")
        if url not in _OPENAI_URLS:
            raise _Bad(f"field 'url' must be one of {', '.join(map(repr, _OPENAI_URLS))}, got {_describe(url)}")
        body = data.get("body")
        if not isinstance(body, dict):
            raise _Bad(f"field 'body' must be an object, got {_describe(body)}")
        request = _openai_prompt(index, row_id, url, body)
        request.sampling, request.sampling_fields = _openai_sampling(body, chat=url == "/v1/chat/completions")
        return request
    except _Bad as e:
        return RowError(index, row_id, str(e))


def _openai_prompt(index: int, row_id: str, url: str, body: dict) -> ParsedRequest:
    if _OPENAI_URLS[url] == "messages":
        if "prompt" in body:
            raise _Bad(f"field 'body.prompt' is not accepted by {url}; use 'body.messages'")
        if _absent(body.get("messages")):
            raise _Bad(f"missing prompt: {url} needs 'body.messages'")
        return ParsedRequest(index, row_id, None, _check_messages(body["messages"], "body.messages"), None, {},
                             "body.messages")
    if "messages" in body:
        raise _Bad(f"field 'body.messages' is not accepted by {url}; use 'body.prompt' or /v1/chat/completions")
    prompt = body.get("prompt")
    if _absent(prompt):
        raise _Bad(f"missing prompt: {url} needs 'body.prompt'")
    # The completions API also takes a one-element list, or token ids.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return ParsedRequest(index, row_id, None, None, _check_token_ids(prompt, "body.prompt"), {}, "body.prompt")
    if isinstance(prompt, list):
        raise _Bad(f"field 'body.prompt' must be one string or one list of token ids (one prompt per request), "
                   f"got {_describe(prompt)}")
    return ParsedRequest(index, row_id, _check_prompt(prompt, "body.prompt"), None, None, {}, "body.prompt")


# OpenAI request options the engine does not implement: refused when used (an error row naming the field), as
# the server refuses them, never silently ignored. False, "", {} and [] (and best_of 1) mean "not used".
_OPENAI_UNSUPPORTED = ("echo", "best_of", "suffix", "logit_bias", "tools", "functions")


def _openai_sampling(body: dict, chat: bool) -> tuple[dict, dict[str, str]]:
    """The request's sampling overrides, and the body field each came from."""
    for name in _OPENAI_UNSUPPORTED:
        value = body.get(name)
        if not _absent(value) and value and not (name == "best_of" and value == 1):
            raise _Bad(f"field 'body.{name}' is not supported (got {_describe(value)})")
    sampling: dict = {}
    fields: dict[str, str] = {}
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if not _absent(max_tokens) and not _absent(max_completion) and max_tokens != max_completion:
        raise _Bad("fields 'body.max_tokens' and 'body.max_completion_tokens' disagree; give one")
    for name in SAMPLING_FIELDS:
        if name != "logprobs" and not _absent(body.get(name)):
            sampling[name] = _check_sampling(name, body[name], f"body.{name}", csv=False)
    if _absent(max_tokens) and not _absent(max_completion):
        sampling["max_tokens"] = _as_int(max_completion, "body.max_completion_tokens", csv=False)
        fields["max_tokens"] = "body.max_completion_tokens"
    if not _absent(body.get("response_format")):
        sampling["structured_output"] = _response_format(body["response_format"], "body.response_format", False)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        # Chat: logprobs is a switch and top_logprobs the count of alternatives.
        if not _absent(logprobs) and not isinstance(logprobs, bool):
            raise _Bad(f"field 'body.logprobs' must be a boolean for chat completions, got {_describe(logprobs)}")
        if logprobs:
            sampling["logprobs"] = 0 if _absent(top) else _as_int(top, "body.top_logprobs", csv=False)
            fields["logprobs"] = "body.logprobs" if _absent(top) else "body.top_logprobs"
        elif not _absent(top):
            raise _Bad("field 'body.top_logprobs' needs 'body.logprobs': true")
    elif not _absent(logprobs):
        sampling["logprobs"] = _as_int(logprobs, "body.logprobs", csv=False)
    for name in sampling:
        if name != "structured_output":  # its errors name body.response_format already
            fields.setdefault(name, f"body.{name}")
    return sampling, fields


# --- helpers ----------------------------------------------------------------


def _row_id(data: dict, field: str, default: str) -> str:
    value = data.get(field)
    if _absent(value):
        return default
    if isinstance(value, str):
        if value == "":
            raise _Bad(f"field {field!r} is an empty string; give a non-empty id or leave it out")
        return value
    if _is_int(value):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an integer id column with missing cells comes back as float
    raise _Bad(f"field {field!r} must be a string or an integer, got {_describe(value)}")


def _maybe_json(value: Any, field: str) -> Any:
    # messages / token ids never are plain strings, so a string is JSON text
    # (a CSV cell, or a string column in Parquet).
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise _Bad(f"field {field!r} is a string that is not valid JSON: {e}") from None
    return value


def _absent(value: Any) -> bool:
    # Missing cells of Parquet / CSV / pandas-made files come back as None or NaN.
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


__all__ = ["SAMPLING_FIELDS", "FieldNames", "ParsedRequest", "RowError", "parse_record"]
