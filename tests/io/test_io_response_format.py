"""A record's response_format becomes its structured output (tokenizer-free), or a row error naming the field."""
from __future__ import annotations

import json

import pytest

from pagedbatch.io import InputRecord, ParsedRequest, RowError, parse_record

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
RF = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}


def _parse(data, fmt="jsonl"):
    return parse_record(InputRecord(0, data, None), fmt=fmt)


@pytest.mark.parametrize("fmt, value", [("jsonl", RF), ("jsonl", json.dumps(RF)), ("csv", json.dumps(RF)),
                                        ("parquet", RF)])
def test_response_format_as_object_or_json_text_gives_the_schema(fmt, value):
    out = _parse({"prompt": "hi", "response_format": value}, fmt)
    assert isinstance(out, ParsedRequest) and out.sampling["structured_output"].json == SCHEMA


def test_parquet_struct_nulls_are_dropped_but_jsonl_nulls_are_kept():
    # A struct column carries every row's keys; a JSON schema's own null (e.g. "const": null) only comes from JSON.
    with_nulls = {"type": "json_schema", "json_schema": {"name": None, "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "maxLength": None}}}}}
    assert _parse({"prompt": "hi", "response_format": with_nulls}, "parquet").sampling["structured_output"].json == SCHEMA
    const_null = {"type": "json_schema", "json_schema": {"schema": {"const": None}}}
    assert _parse({"prompt": "hi", "response_format": const_null}).sampling["structured_output"].json == {"const": None}


def test_text_clears_any_default_and_openai_bodies_are_read():
    assert _parse({"prompt": "hi", "response_format": {"type": "text"}}).sampling == {"structured_output": None}
    assert "structured_output" not in _parse({"prompt": "hi"}).sampling
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}}
    assert _parse(line, "openai").sampling["structured_output"].json_object


@pytest.mark.parametrize("value, message", [
    ({"type": "xml"}, "field 'response_format.type': must be one of 'text', 'json_object', 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "field 'response_format.json_schema.schema': is missing"),
    ("{oops", "field 'response_format' is a string that is not valid JSON"),
    (["json_object"], "field 'response_format': must be an object with a 'type'"),
])
def test_bad_response_formats_are_row_errors_naming_the_field(value, message):
    out = _parse({"prompt": "hi", "response_format": value})
    assert isinstance(out, RowError) and out.error.startswith(message), out
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "response_format": value}}
    out = _parse(line, "openai")
    assert isinstance(out, RowError) and "'body.response_format" in out.error
