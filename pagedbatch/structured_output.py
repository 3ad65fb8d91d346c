"""Structured output: what a request's text must match, checked without a tokenizer.

``StructuredOutputParams`` holds exactly one of: a JSON schema (``json``),
any JSON object (``json_object``), a regular expression (``regex``), a list
of allowed outputs (``choice``) or an EBNF grammar (``grammar``, xgrammar's
GBNF dialect with a ``root`` rule). Checking one is cheap and needs no
tokenizer, so the job runner, the server and ``SamplingParams`` validate
requests with it; compiling it for a model (``engine/structured.py``) needs
the tokenizer and happens once per distinct grammar.

``from_response_format`` reads OpenAI's ``response_format`` (``text``,
``json_object``, ``json_schema``), which the job rows and the server take.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any, Optional, Union

KINDS = ("json", "json_object", "regex", "choice", "grammar")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class StructuredOutputError(ValueError):
    """A structured-output request that cannot run: ``where`` names the field, ``problem`` says what is wrong."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


@dataclass(frozen=True)
class StructuredOutputParams:
    """One output constraint; give exactly one field.

    ``json``: a JSON schema, as a dict or as JSON text. ``json_object``: any
    JSON object. ``regex``: the whole output matches it. ``choice``: the
    output is one of these strings. ``grammar``: EBNF text whose start rule is
    ``root``. JSON is generated on one line with ``", "`` and ``": "``
    separators (no free whitespace: a model cannot pad it forever).
    """

    json: Union[dict, str, None] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object)]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise StructuredOutputError("structured_output", f"give exactly one of {', '.join(KINDS)}; got {got}")
        kind = given[0]
        where = f"structured_output.{kind}"
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as e:
                    raise StructuredOutputError(where, f"the schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise StructuredOutputError(where, f"must be a JSON schema (an object, or JSON text of one), "
                                                   f"got {_describe(schema)}")
            object.__setattr__(self, "json", schema)
            # Key order is kept: xgrammar emits properties in the schema's order.
            text = _json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        elif kind == "json_object":
            if self.json_object is not True:
                raise StructuredOutputError(where, f"must be true, got {_describe(self.json_object)}")
            text = ""
        elif kind == "choice":
            choice = self.choice
            if not isinstance(choice, (list, tuple)) or not choice:
                raise StructuredOutputError(where, f"must be a non-empty list of strings, got {_describe(choice)}")
            bad = [c for c in choice if not isinstance(c, str) or not c]
            if bad:
                raise StructuredOutputError(where, f"every choice must be a non-empty string, got {_describe(bad[0])}")
            object.__setattr__(self, "choice", list(choice))
            text = _json.dumps(list(choice), ensure_ascii=False)
        else:  # regex, grammar
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise StructuredOutputError(where, f"must be a non-empty string, got {_describe(value)}")
            text = value
        object.__setattr__(self, "_key", (kind, text))

    @property
    def kind(self) -> str:
        """Which of ``KINDS`` this is."""
        return self._key[0]

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar."""
        return self._key

    @property
    def where(self) -> str:
        """The field name errors about this constraint carry, e.g. ``structured_output.json``."""
        return f"structured_output.{self.kind}"

    @classmethod
    def from_dict(cls, values: Any) -> "StructuredOutputParams":
        if not isinstance(values, dict):
            raise StructuredOutputError("structured_output", f"must be an object with one of {', '.join(KINDS)}, "
                                                             f"got {_describe(values)}")
        unknown = sorted(set(values) - set(KINDS))
        if unknown:
            raise StructuredOutputError("structured_output", f"unknown key(s) {', '.join(map(repr, unknown))}; "
                                                             f"expected one of {', '.join(KINDS)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The one field given, JSON-serialisable (``from_dict`` reads it back)."""
        return {self.kind: getattr(self, self.kind)}

    @classmethod
    def from_response_format(cls, value: Any, where: str = "response_format") -> Optional["StructuredOutputParams"]:
        """OpenAI's ``response_format``: ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``,
        ``{"type": "json_object"}`` or ``{"type": "text"}`` (None: no constraint). Errors name ``where``'s sub-field."""
        if not isinstance(value, dict):
            raise StructuredOutputError(where, f"must be an object with a 'type', got {_describe(value)}")
        kind = value.get("type")
        if kind not in RESPONSE_FORMAT_TYPES:
            raise StructuredOutputError(f"{where}.type", f"must be one of {', '.join(map(repr, RESPONSE_FORMAT_TYPES))}, "
                                                         f"got {_describe(kind)}")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise StructuredOutputError(f"{where}.json_schema", "must be an object with a 'schema' (and a 'name'), "
                                                                f"got {_describe(spec)}")
        schema = spec.get("schema")
        if schema is None:
            raise StructuredOutputError(f"{where}.json_schema.schema", "is missing: give the JSON schema")
        try:
            return cls(json=schema)
        except StructuredOutputError as e:
            raise StructuredOutputError(f"{where}.json_schema.schema", e.problem) from None


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"
