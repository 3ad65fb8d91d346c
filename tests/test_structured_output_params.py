"""StructuredOutputParams: one constraint per request, checked without a tokenizer, errors naming the field."""
from __future__ import annotations

import pickle

import pytest

from pagedbatch import SamplingParams
from pagedbatch.structured_output import StructuredOutputError, StructuredOutputParams


def test_each_kind_is_accepted_alone_and_keyed_by_its_canonical_text():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    from_dict = StructuredOutputParams(json=schema)
    from_text = StructuredOutputParams(json='{"type": "object", "properties": {"b": {"type": "string"}, '
                                            '"a": {"type": "integer"}}}')
    assert from_dict.key == from_text.key and from_text.json == schema
    # Property order is part of the grammar (xgrammar writes properties in the schema's order).
    swapped = StructuredOutputParams(json={"type": "object", "properties": {"a": schema["properties"]["a"],
                                                                            "b": schema["properties"]["b"]}})
    assert swapped.key != from_dict.key
    assert StructuredOutputParams(regex="a+").key == ("regex", "a+")
    assert StructuredOutputParams(choice=("x", "y")).choice == ["x", "y"]
    assert StructuredOutputParams(json_object=True).kind == "json_object"
    assert StructuredOutputParams(grammar='root ::= "a"').kind == "grammar"


@pytest.mark.parametrize("kwargs, where, problem", [
    ({}, "structured_output", "give exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "structured_output", "got regex, choice"),
    ({"json": "{not json"}, "structured_output.json", "not valid JSON"),
    ({"json": [1, 2]}, "structured_output.json", "must be a JSON schema"),
    ({"choice": []}, "structured_output.choice", "non-empty list"),
    ({"choice": ["ok", ""]}, "structured_output.choice", "non-empty string"),
    ({"regex": ""}, "structured_output.regex", "non-empty string"),
    ({"json_object": "yes"}, "structured_output.json_object", "must be true"),
])
def test_bad_params_name_the_field(kwargs, where, problem):
    with pytest.raises(StructuredOutputError) as e:
        StructuredOutputParams(**kwargs)
    assert e.value.where == where and problem in e.value.problem and str(e.value).startswith(where)


_OBJ = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}


@pytest.mark.parametrize("schema, keyword, at", [
    ({"allOf": [_OBJ, {"required": ["a"]}]}, "'allOf' with more than one", "the top level"),
    ({"type": "integer", "not": {"const": 3}}, "'not'", "the top level"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "'contains'", "the top level"),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
     "'uniqueItems'", "properties.tags"),
    ({"type": "string", "format": "email", "maxLength": 5}, "'format' with 'maxLength'", "the top level"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "'pattern' with 'maxLength'", "the top level"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"multipleOf": 2}}, "'if'/'then'/'else'", "the top level"),
    ({**_OBJ, "dependentRequired": {"a": ["b"]}}, "'dependentRequired'", "the top level"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "the external '$ref'",
     "properties.a"),
    ({"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n", "minimum": 5}},
     "'minimum' beside '$ref'", "items"),
    ({**_OBJ, "anyOf": [{"required": ["a"]}]}, "'properties', 'type' beside 'anyOf'", "the top level"),
    ({"type": "number", "multipleOf": 0.5}, "'multipleOf'", "the top level"),
    ({"anyOf": [{"type": "null"}, {"type": "string", "enum": ["ab", "cd"], "pattern": "^a"}]}, "'pattern' beside 'enum'",
     "anyOf[1]"),
])
def test_schema_rules_xgrammar_would_not_enforce_are_refused_naming_keyword_and_place(schema, keyword, at):
    # Each of these compiles in xgrammar 0.2.9 and then lets through output that breaks the rule.
    with pytest.raises(StructuredOutputError) as e:
        StructuredOutputParams(json=schema)
    assert e.value.where == "structured_output.json"
    assert f"uses {keyword}" in e.value.problem and f"at {at}," in e.value.problem, e.value.problem


def test_schemas_pydantic_writes_are_accepted():
    # Optional fields (anyOf + null beside annotations), nested models ($ref), enums, tagged unions (oneOf with a
    # discriminator), one-branch allOf, bounded strings and arrays.
    schema = {
        "$defs": {"Inner": {"properties": {"x": {"maximum": 5, "minimum": 0, "type": "integer"}}, "required": ["x"],
                            "title": "Inner", "type": "object"},
                  "Color": {"enum": ["red", "blue"], "title": "Color", "type": "string"}},
        "properties": {
            "name": {"maxLength": 10, "minLength": 1, "title": "Name", "type": "string"},
            "tags": {"items": {"type": "string"}, "maxItems": 3, "type": "array"},
            "inner": {"$ref": "#/$defs/Inner"},
            "maybe": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}], "default": None},
            "color": {"allOf": [{"$ref": "#/$defs/Color"}], "description": "the colour"},
            "pet": {"discriminator": {"propertyName": "kind"}, "oneOf": [
                {"properties": {"kind": {"const": "cat", "type": "string"}}, "required": ["kind"], "type": "object"},
                {"properties": {"kind": {"const": "dog", "type": "string"}}, "required": ["kind"], "type": "object"}]},
            "count": {"type": "integer", "multipleOf": 3},
            "scores": {"additionalProperties": {"type": "integer"}, "type": "object"}},
        "required": ["name", "tags", "inner", "color", "pet", "count", "scores"], "title": "M", "type": "object"}
    assert StructuredOutputParams(json=schema).json == schema


def test_response_format_reads_openais_three_types():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = StructuredOutputParams.from_response_format({"type": "json_schema",
                                                      "json_schema": {"name": "x", "strict": True, "schema": schema}})
    assert so.json == schema
    assert StructuredOutputParams.from_response_format({"type": "json_object"}).json_object
    assert StructuredOutputParams.from_response_format({"type": "text"}) is None
    for value, where in [({"type": "xml"}, "response_format.type"),
                         ({"type": "json_schema"}, "response_format.json_schema"),
                         ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
                         ({"type": "json_schema", "json_schema": {"schema": "[1"}}, "response_format.json_schema.schema"),
                         ("json", "response_format")]:
        with pytest.raises(StructuredOutputError) as e:
            StructuredOutputParams.from_response_format(value)
        assert e.value.where == where


def test_sampling_params_take_a_dict_refuse_min_tokens_and_stop_strings_and_pickle():
    p = SamplingParams.from_dict({"max_tokens": 5, "structured_output": {"choice": ["a", "b"]}})
    assert isinstance(p.structured_output, StructuredOutputParams)
    assert pickle.loads(pickle.dumps(p)) == p  # data-parallel workers receive prepared rows pickled
    assert pickle.loads(pickle.dumps(p)).structured_output.key == p.structured_output.key
    assert p.replace(temperature=0).structured_output is p.structured_output
    with pytest.raises(ValueError, match="structured_output.*min_tokens"):
        p.replace(min_tokens=1)
    with pytest.raises(ValueError, match="structured_output.*stop strings"):
        p.replace(stop=["}"])  # would cut the constrained text and call it a normal stop
    assert p.replace(stop_token_ids=[7]).stop_token_ids == [7]  # a stop token ends the grammar itself
    with pytest.raises(StructuredOutputError, match="unknown key"):
        SamplingParams(structured_output={"jsonschema": {}})
    with pytest.raises(ValueError, match="structured_output must be"):
        SamplingParams(structured_output="a+")
