"""One input record -> a request ready for an engine, or an error row.

Parsing, sampling validation, chat rendering and tokenization all happen
here, before admission: ``--order`` sorts by token ids, and a bad record
becomes an error row without ever reaching an engine. Only a tokenizer and
the vocabulary size are needed, not a loaded model, so a data-parallel
parent prepares every row itself and hands workers ready token ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from ..io import FieldNames, ParsedRequest, RowError, parse_record
from ..sampling_params import SamplingParams
from ..structured_output import StructuredOutputError, StructuredOutputParams
from .options import JobOptions, structured_option_name


@dataclass
class Pending:
    """What a result row needs from its record besides the engine's output."""

    index: int
    id: str
    prompt: Optional[str]  # the text (chat messages as JSON) for --include-prompt; None for token ids
    is_chat: bool
    field: str  # the input field the prompt came from, for error messages


@dataclass
class Prepared:
    token_ids: list[int]
    params: SamplingParams
    pending: Pending


class RowPreparer:
    """Turns records into ``Prepared`` requests or ``RowError`` rows.

    ``check_prompt(prompt) -> token ids`` raises ValueError/TypeError for a
    prompt the model cannot take (``LLMEngine.validate_prompt`` or
    ``engine.tokenizer.prompt_token_ids`` bound to a tokenizer).
    ``check_structured(params)`` compiles a row's structured output
    (``LLMEngine.check_structured_output``, or a ``GrammarCompilerCache``'s
    ``check``) and raises ``StructuredOutputError`` if it cannot; the job's
    default is checked here, at once: ValueError naming the option."""

    def __init__(self, opts: JobOptions, fmt: str, tokenizer: Any,
                 check_prompt: Callable[[Union[str, list[int]]], list[int]],
                 check_structured: Optional[Callable[[SamplingParams], None]] = None):
        self.opts = opts
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.check_prompt = check_prompt
        self.check_structured = check_structured
        self.fields = FieldNames(opts.prompt_field, opts.messages_field, opts.prompt_token_ids_field, opts.id_field)
        self.defaults = opts.default_sampling()
        if "structured_output" in self.defaults:
            # Parsed once here, not for every row (a schema is canonicalised on parsing).
            self.defaults["structured_output"] = StructuredOutputParams.from_dict(self.defaults["structured_output"])
            if check_structured is not None:
                try:
                    check_structured(SamplingParams.from_dict(self.defaults))
                except StructuredOutputError as e:
                    raise ValueError(f"{structured_option_name(opts)}: {e.problem}") from None

    def prepare(self, rec) -> Union[Prepared, RowError]:
        parsed = parse_record(rec, self.fields, self.fmt)
        if isinstance(parsed, RowError):
            return parsed
        assert isinstance(parsed, ParsedRequest)
        # A row's own response_format is named in its errors; the job's default was checked at startup.
        structured_field = (("body." if self.fmt == "openai" else "") + "response_format"
                            if "structured_output" in parsed.sampling else structured_option_name(self.opts))
        try:
            params = SamplingParams.from_dict({**self.defaults, **parsed.sampling})
        except ValueError as e:
            # SamplingParams' messages start with the field's name.
            name = str(e).split(" ", 1)[0]
            if name == "structured_output":
                name = structured_field
            where = f"field {name!r}" if name in SamplingParams.__dataclass_fields__ or name == structured_field \
                else "sampling"
            return RowError(parsed.index, parsed.id, f"{where}: invalid value: {e}")
        if params.structured_output is not None and self.check_structured is not None:
            try:
                self.check_structured(params)
            except StructuredOutputError as e:
                return RowError(parsed.index, parsed.id, f"field {structured_field!r}: {e.problem}")
        if self.opts.include_logprobs and params.logprobs is None:
            params = params.replace(logprobs=0)
        openai = self.fmt == "openai"
        if parsed.messages is not None:
            field_name = "body.messages" if openai else self.fields.messages
            try:
                from ..engine.tokenizer import encode_chat

                prompt: Any = encode_chat(self.tokenizer, parsed.messages)
            except Exception as e:  # jinja and tokenizer errors: the row is bad, not the job
                return RowError(parsed.index, parsed.id, f"field {field_name!r}: cannot render the chat: {e}")
            text = json.dumps(parsed.messages, ensure_ascii=False)
        elif parsed.prompt is not None:
            field_name = "body.prompt" if openai else self.fields.prompt
            prompt = text = parsed.prompt
        else:
            field_name = "body.prompt" if openai else self.fields.prompt_token_ids
            prompt, text = parsed.prompt_token_ids, None
        try:
            ids = self.check_prompt(prompt)
        except (ValueError, TypeError) as e:
            return RowError(parsed.index, parsed.id, f"field {field_name!r}: {e}")
        return Prepared(ids, params, Pending(parsed.index, parsed.id, text, parsed.messages is not None, field_name))
