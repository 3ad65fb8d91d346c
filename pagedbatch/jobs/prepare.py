"""One input record -> a request ready for an engine, or an error row.

Parsing (with the prompt template and system prompt), the carried columns'
values, sampling validation, chat rendering and tokenization all happen
here, before admission: ``--order`` sorts by token ids, and a bad record
becomes an error row without ever reaching an engine. Only a tokenizer and
the vocabulary size are needed, not a loaded model, so a data-parallel
parent prepares every row itself and hands workers ready token ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..io import FieldNames, ParsedRequest, RowError, parse_record
from ..io.carried import CarriedColumns
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
    where: str  # where the prompt came from, for error messages: "field 'prompt'", "template"
    carried: Optional[dict] = None  # --keep-columns: result column -> value
    n: int = 1  # samples asked for: the record is done when all n outputs are in
    # The record asked for logprobs (its own field or the job's --logprobs): an OpenAI batch output line carries
    # them. (--include-logprobs alone asks the engine for them too, for the Parquet column only.)
    wants_logprobs: bool = False
    outputs: list = field(default_factory=list)  # its finished samples' RequestOutputs so far


@dataclass
class Prepared:
    token_ids: list[int]
    params: SamplingParams
    pending: Pending


def num_samples(item: Union[Prepared, RowError]) -> int:
    """Engine sequences an item will occupy (what --max-in-flight counts); an error row counts 1."""
    return item.params.n if isinstance(item, Prepared) else 1


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
                 carried: CarriedColumns = CarriedColumns(),
                 check_structured: Optional[Callable[[SamplingParams], None]] = None):
        self.opts = opts
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.check_prompt = check_prompt
        self.check_structured = check_structured
        self.fields = FieldNames(opts.prompt_field, opts.messages_field, opts.prompt_token_ids_field, opts.id_field)
        self.defaults = opts.default_sampling()
        self.max_num_seqs = opts.effective_max_num_seqs
        self.carried = carried
        self.template = None
        if opts.template_text is not None:
            from ..io.templates import PromptTemplate

            self.template = PromptTemplate(opts.template_text)
        if "structured_output" in self.defaults:
            # Parsed once here, not for every row (a schema is canonicalised on parsing).
            self.defaults["structured_output"] = StructuredOutputParams.from_dict(self.defaults["structured_output"])
            if check_structured is not None:
                try:
                    check_structured(SamplingParams.from_dict(self.defaults))
                except StructuredOutputError as e:
                    raise ValueError(f"{structured_option_name(opts)}: {e.problem}") from None

    def prepare(self, rec) -> Union[Prepared, RowError]:
        item = self._prepare(rec)
        if self.carried:
            carried, problem = self.carried.values(rec.data)
            if problem is not None and isinstance(item, Prepared):
                item = RowError(item.pending.index, item.pending.id, problem)
            if isinstance(item, RowError):
                item.carried = carried
            else:
                item.pending.carried = carried
        return item

    def _prepare(self, rec) -> Union[Prepared, RowError]:
        parsed = parse_record(rec, self.fields, self.fmt, template=self.template, system_prompt=self.opts.system_prompt)
        if isinstance(parsed, RowError):
            return parsed
        assert isinstance(parsed, ParsedRequest)
        # A row's own response_format is named in its errors; the job's default was checked at startup.
        structured_field = (("body." if self.fmt == "openai" else "") + "response_format"
                            if "structured_output" in parsed.sampling else structured_option_name(self.opts))
        try:
            params = SamplingParams.from_dict({**self.defaults, **parsed.sampling})
        except ValueError as e:
            # SamplingParams' messages start with the field's name; a row that wrote it under another name
            # (an OpenAI body's top_logprobs is logprobs) is told the name it wrote.
            detail = str(e)
            name = detail.split(" ", 1)[0]
            written = parsed.sampling_fields.get(name)
            if written is not None:
                name, detail = written, written + detail[len(name):]
            elif name == "structured_output":
                name = structured_field
            elif name not in SamplingParams.__dataclass_fields__:
                name = ""
            where = f"field {name!r}" if name else "sampling"
            return RowError(parsed.index, parsed.id, f"{where}: invalid value: {detail}")
        if params.n > self.max_num_seqs:
            # The engine would answer n error outputs; an n the job can never run is a bad value of the record.
            name = "body.n" if self.fmt == "openai" else "n"
            return RowError(parsed.index, parsed.id, f"field {name!r}: {params.n} samples exceed max_num_seqs "
                            f"({self.max_num_seqs}): a record's samples run together; ask for fewer or raise "
                            "--max-num-seqs")
        if params.structured_output is not None and self.check_structured is not None:
            try:
                self.check_structured(params)
            except StructuredOutputError as e:
                return RowError(parsed.index, parsed.id, f"field {structured_field!r}: {e.problem}")
        wants_logprobs = params.logprobs is not None
        if self.opts.include_logprobs and params.logprobs is None:
            params = params.replace(logprobs=0)
        where = "template" if parsed.source == "template" else f"field {parsed.source!r}"
        if parsed.messages is not None:
            try:
                from ..engine.tokenizer import encode_chat

                prompt: Any = encode_chat(self.tokenizer, parsed.messages)
            except Exception as e:  # jinja and tokenizer errors: the row is bad, not the job
                return RowError(parsed.index, parsed.id, f"{where}: cannot render the chat: {e}")
            text = json.dumps(parsed.messages, ensure_ascii=False)
        elif parsed.prompt is not None:
            prompt = text = parsed.prompt
        else:
            prompt, text = parsed.prompt_token_ids, None
        try:
            ids = self.check_prompt(prompt)
        except (ValueError, TypeError) as e:
            return RowError(parsed.index, parsed.id, f"{where}: {e}")
        return Prepared(ids, params, Pending(parsed.index, parsed.id, text, parsed.messages is not None, where,
                                            n=params.n, wants_logprobs=wants_logprobs))

