"""response_format (and our structured_output) on every route: the official openai client gets JSON that
matches its schema; a schema or regex that does not compile is a 400 naming the field."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no", "日本語"]},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["answer", "confidence", "notes"]}
RF = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": SCHEMA}}
SAMPLED = dict(temperature=0.9, seed=3, max_tokens=80)
MESSAGES = [{"role": "user", "content": "Is this spam?"}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_chat_with_a_json_schema_returns_content_that_validates(client):
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, response_format=RF, **SAMPLED)
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].message.content), SCHEMA)


def test_the_clients_pydantic_parse_helper_works(client):
    class Verdict(BaseModel):
        answer: str = Field(max_length=6)
        score: int = Field(ge=0, le=9)

    c = client.chat.completions.parse(model="tiny-llama", messages=MESSAGES, response_format=Verdict, **SAMPLED)
    parsed = c.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and 0 <= parsed.score <= 9


def test_streamed_chat_and_completions_with_json_object_parse(client):
    stream = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, stream=True,
                                            response_format=RF, **SAMPLED)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    c = client.completions.create(model="tiny-llama", prompt=["one", "two"], temperature=0.9, seed=4, max_tokens=80,
                                  extra_body={"response_format": RF})
    for choice in c.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    c = client.completions.create(model="tiny-llama", prompt="x", temperature=0.9, seed=5, max_tokens=12,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert c.choices[0].text.startswith("{")


def test_generate_takes_response_format_or_structured_output(server):
    r = httpx.post(server.url + "/generate", timeout=30, json={"prompt": "hi", **SAMPLED, "response_format": RF})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["text"]), SCHEMA)
    body = {"prompt": "hi", **SAMPLED, "structured_output": {"regex": "[0-9]{3}-[a-z]{2}"}}
    r = httpx.post(server.url + "/generate", timeout=30, json=body)
    assert r.status_code == 200 and re.fullmatch("[0-9]{3}-[a-z]{2}", r.json()["text"]), r.text
    r = httpx.post(server.url + "/generate", timeout=30, json={**body, "structured_output": {"choice": ["a", "b"]}})
    assert r.json()["text"] in ("a", "b") and r.json()["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format", "the JSON schema cannot be compiled"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "yaml"}}, "response_format",
     "response_format.type: must be one of"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "response_format.json_schema.schema: is missing"),
    ("/generate", {"prompt": "x", "structured_output": {"regex": "[a-"}}, "structured_output",
     "the regex cannot be compiled"),
    ("/generate", {"prompt": "x", "structured_output": {"regex": "a", "choice": ["a"]}}, "structured_output",
     "give exactly one of"),
    ("/generate", {"prompt": "x", "response_format": {"type": "json_object"}, "structured_output": {"regex": "a"}},
     "response_format", "at most one of"),
    ("/generate", {"prompt": "x", "min_tokens": 2, "structured_output": {"regex": "a+"}}, "structured_output",
     "min_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": ["}"], "response_format": {"type": "json_object"}},
     "response_format", "stop strings"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}, "response_format",
     "response_format.json_schema.schema: the JSON schema uses 'uniqueItems' at the top level"),
])
def test_bad_structured_output_is_a_400_naming_the_field(server, path, body, param, message):
    r = httpx.post(server.url + path, timeout=30, json={"max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    ok = httpx.post(server.url + "/generate", timeout=30, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200  # the server goes on


def test_the_openai_client_sees_a_bad_schema_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"$ref": "#/nowhere"}}}}})
    assert e.value.body["param"] == "response_format"
