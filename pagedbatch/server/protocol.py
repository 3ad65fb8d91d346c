"""Request bodies: reading them safely and checking every field.

Bodies are parsed as JSON whatever the Content-Type says (``curl -d`` sends
form encoding), after a size check. Types are strict: ``"max_tokens": "10"``
is an error, not 10. Our own ``/generate`` refuses unknown fields (a typo
should not pass silently); the OpenAI routes ignore fields they do not know,
as clients send extras, but refuse the ones whose meaning they cannot honour.
"""
from __future__ import annotations

import json
from typing import Any, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling_params import SamplingParams
from ..structured_output import StructuredOutputError, StructuredOutputParams
from .errors import RequestError, sampling_error

M = TypeVar("M", bound=BaseModel)

MAX_LOGPROBS = 20

# pydantic's names for union branches and wrappers, which are not field names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


class _Sampling(BaseModel):
    """The sampling fields every route takes; names and meanings as in SamplingParams."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_tokens: Optional[int] = None
    min_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    n: Optional[int] = None  # samples of each prompt (the engine computes the prompt once)
    # OpenAI's {"type": "json_schema" | "json_object" | "text", ...}, or ours: {"json" | "json_object" |
    # "regex" | "choice" | "grammar": ...} (the openai client sends it with extra_body).
    response_format: Optional[dict[str, Any]] = None
    structured_output: Optional[dict[str, Any]] = None

    def structured_field(self) -> str:
        """The field a structured-output error names."""
        return "structured_output" if self.structured_output is not None else "response_format"

    def sampling_params(self, **extra: Any) -> SamplingParams:
        """SamplingParams from the fields given (max_tokens is settled on admission)."""
        names = set(_Sampling.model_fields) - {"max_tokens", "response_format", "structured_output"}
        values = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        values.update({k: v for k, v in extra.items() if v is not None})
        values["structured_output"] = self._structured_output()
        # Provisional, so that min_tokens is not checked against the default max_tokens: admission sets the
        # request's own (and checks min_tokens against it).
        values["max_tokens"] = max(1, values.get("min_tokens") or 0)
        try:
            return SamplingParams(**values)
        except ValueError as e:
            if values["structured_output"] is not None and str(e).startswith("structured_output"):
                raise RequestError(str(e).replace("structured_output", self.structured_field(), 1),
                                   self.structured_field()) from None
            raise sampling_error(e) from None

    def _structured_output(self) -> Optional[StructuredOutputParams]:
        if self.response_format is not None and self.structured_output is not None:
            raise RequestError("give at most one of response_format and structured_output", "response_format")
        try:
            if self.structured_output is not None:
                return StructuredOutputParams.from_dict(self.structured_output)
            if self.response_format is not None:
                return StructuredOutputParams.from_response_format(self.response_format)
        except StructuredOutputError as e:
            raise RequestError(str(e), self.structured_field()) from None
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class GenerateRequest(_Sampling):
    """``/generate`` and ``/generate_stream``: a text prompt, token ids, or chat messages."""

    model: Optional[str] = None
    prompt: Union[str, list[int], None] = None
    messages: Optional[list[ChatMessage]] = None
    stream: bool = False
    logprobs: Optional[int] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _OpenAIRequest(_Sampling):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            # OpenAI's answer too: a client asking for usage in a stream it did not ask for has a bug.
            raise RequestError('stream_options is only allowed with "stream": true', "stream_options")


class CompletionRequest(_OpenAIRequest):
    """``/v1/completions``: a prompt, a list of prompts, token ids, or a list of token-id lists."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        return list(p)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise RequestError("echo is not supported", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of must be 1, got {self.best_of}", "best_of")

    def engine_logprobs(self) -> Optional[int]:
        """How many alternatives per token the engine returns (None: no logprobs)."""
        return _check_logprobs(self.logprobs, "logprobs")


class ChatCompletionRequest(_OpenAIRequest):
    """``/v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise RequestError("tools are not supported", "tools")

    def engine_logprobs(self) -> Optional[int]:
        """How many alternatives per token the engine returns (None: no logprobs): top_logprobs, with
        logprobs true (OpenAI's rule: top_logprobs without it is an error)."""
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise RequestError("top_logprobs needs \"logprobs\": true", "top_logprobs")
            return None
        return _check_logprobs(self.top_logprobs or 0, "top_logprobs")

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _check_logprobs(value: Optional[int], field: str) -> Optional[int]:
    # The engine's limit (vLLM's default max_logprobs too); OpenAI's own is 5 for completions, 20 for chat.
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"{field} must be between 0 and {MAX_LOGPROBS}, got {value}", field)
    return value


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: role and plain-text content."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"only text content parts are supported, got {part.get('type')!r}",
                                       f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and m.role != "assistant":  # as the batch job's rows (io/requests.py)
            raise RequestError(f"messages[{i}].content is required for a {m.role!r} message (only an assistant "
                               "message may leave it out or send null)", f"messages[{i}].content")
        out.append({"role": m.role, "content": content or ""})
    return out


def check_model(name: Optional[str], served: str, aliases: tuple[str, ...] = ()) -> None:
    """A 404 with OpenAI's code "model_not_found" (the openai client raises NotFoundError) for another model."""
    if name is not None and name != served and name not in aliases:
        raise model_not_found(name, served)


def model_not_found(name: str, served: str) -> RequestError:
    return RequestError(f"the model {name!r} does not exist here; this server serves {served!r} (see GET /v1/models)",
                        "model", status=404, type="invalid_request_error", code="model_not_found")


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than ``max_bytes`` without reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(int(length), max_bytes, exact=True)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, exact=False)  # the rest is not read
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int, exact: bool) -> RequestError:
    return RequestError(f"the request body is {'' if exact else 'at least '}{size} bytes; this server takes at most "
                        f"{max_bytes} (--max-body-bytes)", "body", status=413)


async def read_json(request, model: type[M], max_bytes: int) -> M:
    """Parse and validate a JSON object body into ``model``; RequestError naming the field if it is wrong."""
    body = await read_body(request, max_bytes)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", "body") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}", "body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> RequestError:
    """One 422 RequestError for all of a body's field errors, the first field as ``param``."""
    by_field: dict[str, list[str]] = {}
    for err in e.errors():
        field = _field_name(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        if msg not in by_field.setdefault(field, []):
            by_field[field].append(msg)
    message = "; ".join(f"{field}: {' or '.join(msgs)}" for field, msgs in by_field.items())
    return RequestError(message, next(iter(by_field), None), status=422)


def _field_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.lower() in _TYPE_TAGS or not part.replace("_", "").isalnum():
            continue  # a union branch such as 'list[int]' or 'str'
        else:
            name += f".{part}" if name else part
    return name or "body"
