"""What the engine thread checks before a request joins the batch.

A request arrives as a ``Submission`` (prompt text, token ids or chat
messages, plus sampling settings). Admission tokenizes it and settles
``max_tokens`` against the model's length, the KV cache and the server's
cap, so that a request the engine could never finish is refused up front
with the field to blame, instead of failing later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from ..sampling_params import SamplingParams
from ..structured_output import StructuredOutputError
from .errors import RequestError, sampling_error


@dataclass
class Submission:
    """One engine request as the HTTP side hands it to the engine thread."""

    request_id: str
    prompt: Union[str, list[int], None]
    messages: Optional[list[dict[str, Any]]]
    params: SamplingParams  # its max_tokens is replaced on admission
    max_tokens: Optional[int]  # as the client asked; None: the default below
    default_max_tokens: Optional[int]  # None: whatever room the context leaves
    stream: bool
    sink: Callable[[object], None]  # called on the engine thread with each event
    structured_field: str = "response_format"  # the field a grammar that does not compile is blamed on
    max_tokens_field: str = "max_tokens"  # what the client called it (chat: max_completion_tokens)


@dataclass
class Accepted:
    """First event of an admitted request."""

    prompt_tokens: int
    max_tokens: int


def resolve_max_tokens(num_prompt_tokens: int, requested: Optional[int], default: Optional[int],
                       max_model_len: int, cache_tokens: int, cap: int, prompt_field: str = "prompt",
                       field: str = "max_tokens") -> int:
    """The request's max_tokens; RequestError naming the field when it cannot fit.

    An explicit value that does not fit is an error; the default shrinks to fit.
    """
    limit = min(max_model_len, cache_tokens)
    room = limit - num_prompt_tokens
    if requested is not None:
        if requested < 1:
            raise RequestError(f"{field} must be >= 1, got {requested}", field)
        if requested > cap:
            raise RequestError(f"{field} {requested} is above this server's limit of {cap}", field)
    if room < 1:
        raise RequestError(f"the prompt is {num_prompt_tokens} tokens, leaving no room to generate: this model "
                           f"takes at most {limit} tokens (prompt + output)", prompt_field)
    if requested is None:
        return max(1, min(room, cap, default if default is not None else room))
    if requested > room:
        what = "the model's maximum length" if limit == max_model_len else "the whole KV cache"
        raise RequestError(f"prompt ({num_prompt_tokens} tokens) + {field} ({requested}) = "
                           f"{num_prompt_tokens + requested} exceeds {what} of {limit} tokens", field)
    return requested


def admit(engine, sub: Submission, cap: int) -> tuple[list[int], SamplingParams]:
    """Prompt token ids and final sampling params for ``sub`` on ``engine`` (an LLMEngine)."""
    n, max_seqs = sub.params.n, engine.config.max_num_seqs
    if n > max_seqs:
        raise RequestError(f"n {n} is above this server's limit of {max_seqs} samples per request (its engine's "
                           f"--max-num-seqs: the samples of a request run together)", "n")
    field = "messages" if sub.messages is not None else "prompt"
    if sub.messages is not None:
        ids = _encode_chat(engine, sub.messages)
    else:
        try:
            ids = engine.validate_prompt(sub.prompt)
        except ValueError as e:
            raise RequestError(str(e), field) from None
    max_tokens = resolve_max_tokens(len(ids), sub.max_tokens, sub.default_max_tokens, engine.max_model_len,
                                    engine.cache_capacity_tokens, cap, field, sub.max_tokens_field)
    try:
        params = sub.params.replace(max_tokens=max_tokens)
    except ValueError as e:
        raise sampling_error(e) from None
    if params.structured_output is not None:
        try:
            engine.check_structured_output(params)  # compiled once per distinct grammar, on the engine thread
        except StructuredOutputError as e:
            raise RequestError(f"{sub.structured_field}: {e.problem}", sub.structured_field) from None
    return ids, params


def _encode_chat(engine, messages: list[dict[str, Any]]) -> list[int]:
    from ..engine.tokenizer import encode_chat

    if engine.tokenizer is None:
        raise RequestError("this server has no tokenizer, so 'messages' cannot be used", "messages")
    try:
        ids = encode_chat(engine.tokenizer, messages)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    except Exception as e:  # a template may raise anything (jinja's TemplateError, a KeyError, ...)
        raise RequestError(f"the chat template could not render these messages: {type(e).__name__}: {e}",
                           "messages") from None
    try:
        return engine.validate_prompt(ids)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
