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
            problem = unenforced_schema_feature(schema)
            if problem:
                raise StructuredOutputError(where, problem)
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


# Keywords that say what a schema is about, not what a value may be: no grammar needs them.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id", "$anchor", "$defs", "definitions", "discriminator"})
# Keywords whose value is a schema, a list of schemas, or a name -> schema mapping (where the walk goes on).
_ONE_SUBSCHEMA = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                  "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# Keywords xgrammar (0.2.9) compiles without enforcing them: a matched output could break the schema.
_IGNORED = {"not": "'not'", "contains": "'contains'", "minContains": "'minContains'", "maxContains": "'maxContains'",
            "if": "'if'/'then'/'else'", "then": "'if'/'then'/'else'", "else": "'if'/'then'/'else'",
            "dependentRequired": "'dependentRequired'", "dependentSchemas": "'dependentSchemas'",
            "dependencies": "'dependencies'"}


def unenforced_schema_feature(schema: Any, path: str = "") -> Optional[str]:
    """Why the JSON schema cannot be enforced while decoding, or None: the first keyword (with its place in the
    schema) that xgrammar would compile and then not hold the output to.

    Without this check such a schema compiles and the output can break it
    (found by testing xgrammar 0.2.9: ``uniqueItems`` lets ``[1, 1]`` through,
    ``allOf`` keeps one branch's rules, a ``pattern`` beside ``maxLength``
    drops the length). A request is refused instead, naming the keyword, so
    nothing claims a guarantee it does not give. ``oneOf`` is held as
    ``anyOf`` (a value may match more than one branch), as vLLM and SGLang do.
    """
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            found = unenforced_schema_feature(sub, f"{path}[{i}]")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    at = f" at {path[1:]}" if path else " at the top level"

    def refuse(what: str, why: str) -> str:
        return f"the JSON schema uses {what}{at}, which constrained decoding cannot enforce ({why}); " \
               "remove it, or check that rule after generation"

    for key, what in _IGNORED.items():
        if key in schema:
            return refuse(what, "the output could break it")
    if schema.get("uniqueItems") is True:
        return refuse("'uniqueItems'", "array items could repeat")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return refuse("'allOf' with more than one schema", "only one would hold; merge them into one schema")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return refuse(f"the external '$ref' {ref!r}", "only references inside the schema ('#/...') are read")
    rules = sorted(k for k in schema if k not in _ANNOTATIONS)
    for combinator in ("$ref", "anyOf", "oneOf"):
        if combinator in schema and len(rules) > 1:
            others = ", ".join(repr(k) for k in rules if k != combinator)
            return refuse(f"{others} beside {combinator!r}", f"the rules beside {combinator!r} would be dropped; "
                                                             f"move them into the schema(s) it names")
    length = [k for k in ("minLength", "maxLength") if k in schema]
    if "format" in schema and (length or "pattern" in schema):
        return refuse(f"'format' with {', '.join(repr(k) for k in length + ['pattern'] if k in schema)}",
                      "only the format would hold")
    if "pattern" in schema and length:
        return refuse(f"'pattern' with {', '.join(map(repr, length))}", "only the pattern would hold; write the "
                                                                       "length into the pattern, e.g. {1,20}")
    for data in ("enum", "const"):
        extra = [k for k in rules if k not in (data, "type")]
        if data in schema and extra:
            return refuse(f"{', '.join(map(repr, extra))} beside {data!r}", f"only the {data} would hold; "
                                                                            "list only values that pass")
    multiple = schema.get("multipleOf")
    if multiple is not None and (schema.get("type") != "integer" or isinstance(multiple, bool)
                                 or not isinstance(multiple, int)):
        return refuse("'multipleOf' on a non-integer type or with a non-integer value",
                      "only whole multiples of integers are held")
    for key in _ONE_SUBSCHEMA:
        if key in schema:
            found = unenforced_schema_feature(schema[key], f"{path}.{key}")
            if found:
                return found
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            found = unenforced_schema_feature(schema[key], f"{path}.{key}")
            if found:
                return found
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                found = unenforced_schema_feature(sub, f"{path}.{key}.{name}")
                if found:
                    return found
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"
