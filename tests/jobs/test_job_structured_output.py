"""Structured output in batch jobs: per-row response_format (JSONL, Parquet, CSV, OpenAI batch lines), job
defaults (--json-schema, --regex, --choice), bad schemas as error rows or as a clear error before any work."""
from __future__ import annotations

import csv
import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, results, run_cli, write_jsonl

# Every string, array and number is bounded: a random model's output completes well inside max_tokens.
SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["spam", "ham", "日本語"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 100},
    "words": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
    "required": ["label", "score", "words"]}
RF = {"type": "json_schema", "json_schema": {"name": "triage", "schema": SCHEMA}}
SAMPLED = ["--temperature", "0.9", "--seed", "5", "--max-tokens", "64"]


def _by_id(out) -> dict:
    return {row["id"]: row for row in results(out)}


def _valid(row, schema=SCHEMA):
    assert row["error"] is None and row["finish_reason"] == "stop", row
    jsonschema.validate(json.loads(row["output"]), schema)


def test_jsonl_rows_take_response_format_as_object_or_json_text_and_bad_ones_become_error_rows(tmp_path, llama_dir):
    rows = [
        {"id": "object", "prompt": "classify: buy now", "response_format": RF},
        {"id": "text-json", "prompt": "classify: hello", "response_format": json.dumps(RF)},
        {"id": "json-object", "prompt": "any object", "response_format": {"type": "json_object"}, "max_tokens": 24},
        {"id": "plain", "prompt": "no constraint", "response_format": {"type": "text"}, "max_tokens": 6},
        {"id": "bad-schema", "prompt": "x", "response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "b", "schema": {"type": "strin"}}}},
        {"id": "bad-type", "prompt": "x", "response_format": {"type": "xml"}},
        {"id": "with-min-tokens", "prompt": "x", "response_format": RF, "min_tokens": 3},
        {"id": "with-stop", "prompt": "x", "response_format": RF, "stop": ["}"]},
        {"id": "fine-after", "prompt": "classify: after the errors", "response_format": RF},
    ]
    out = tmp_path / "out"
    r = run_cli(["--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", out, "--model", llama_dir,
                 *FAST, *SAMPLED])
    assert r.exit_code == 0, r.output
    got = _by_id(out)
    for name in ("object", "text-json", "fine-after"):
        _valid(got[name])
    j = got["json-object"]
    assert j["output"].startswith("{") and (j["finish_reason"] == "length" or isinstance(json.loads(j["output"]), dict))
    assert got["plain"]["error"] is None and got["plain"]["output_tokens"] == 6
    assert got["bad-schema"]["finish_reason"] == "error"
    assert re.match(r"field 'response_format': the JSON schema cannot be compiled: .*strin", got["bad-schema"]["error"])
    assert got["bad-type"]["error"].startswith("field 'response_format.type': must be one of")
    assert "min_tokens" in got["with-min-tokens"]["error"] and "'response_format'" in got["with-min-tokens"]["error"]
    assert "stop strings" in got["with-stop"]["error"] and got["with-stop"]["finish_reason"] == "error"


def test_parquet_struct_csv_text_and_openai_batch_lines_all_carry_response_format(tmp_path, llama_dir):
    # Parquet: a struct column gives every row the union of the keys, null where a row has none.
    other = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}}}
    table = pa.Table.from_pylist([{"id": "a", "prompt": "one", "response_format": RF, "max_tokens": None},
                                  {"id": "b", "prompt": "two", "response_format": other, "max_tokens": None},
                                  {"id": "c", "prompt": "three", "response_format": None, "max_tokens": 4}])
    pq.write_table(table, tmp_path / "in.parquet")
    r = run_cli(["--input", tmp_path / "in.parquet", "--output", tmp_path / "pq", "--model", llama_dir, *FAST, *SAMPLED])
    assert r.exit_code == 0, r.output
    got = _by_id(tmp_path / "pq")
    _valid(got["a"])
    _valid(got["b"], other["json_schema"]["schema"])
    assert got["c"]["error"] is None and got["c"]["output_tokens"] == 4

    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response_format"])
        w.writerow(["a", "one", json.dumps(RF)])
        w.writerow(["b", "two", "{not json"])
    r = run_cli(["--input", tmp_path / "in.csv", "--output", tmp_path / "csv", "--model", llama_dir, *FAST, *SAMPLED])
    assert r.exit_code == 0, r.output
    got = _by_id(tmp_path / "csv")
    _valid(got["a"])
    assert got["b"]["error"].startswith("field 'response_format' is a string that is not valid JSON")

    lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "Triage this"}], "response_format": RF}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}}}]
    out = tmp_path / "openai"
    r = run_cli(["--input", write_jsonl(tmp_path / "batch.jsonl", lines), "--output", out, "--model", llama_dir,
                 "--output-format", "jsonl", *FAST, *SAMPLED])
    assert r.exit_code == 0, r.output
    answers = {a["custom_id"]: a for a in map(json.loads, (out / "output.jsonl").read_text().splitlines())}
    content = answers["chat"]["response"]["body"]["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), SCHEMA)  # the content is the JSON text, as OpenAI's
    assert answers["bad"]["error"]["message"].startswith("field 'body.response_format.json_schema.schema'")


def test_job_defaults_constrain_every_row_and_a_rows_own_response_format_wins(tmp_path, llama_dir):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    rows = [{"id": "default", "prompt": "one"}, {"id": "own", "prompt": "two", "response_format": {"type": "text"},
                                                 "max_tokens": 5}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    r = run_cli(["--input", src, "--output", tmp_path / "schema", "--model", llama_dir, *FAST, *SAMPLED,
                 "--json-schema", schema_file])
    assert r.exit_code == 0, r.output
    got = _by_id(tmp_path / "schema")
    _valid(got["default"])
    assert got["own"]["error"] is None and got["own"]["output_tokens"] == 5
    r = run_cli(["--input", src, "--output", tmp_path / "regex", "--model", llama_dir, *FAST, *SAMPLED,
                 "--regex", "[a-z]{2,6}-[0-9]{2}"])
    assert r.exit_code == 0, r.output
    assert re.fullmatch("[a-z]{2,6}-[0-9]{2}", _by_id(tmp_path / "regex")["default"]["output"])
    r = run_cli(["--input", src, "--output", tmp_path / "choice", "--model", llama_dir, *FAST, *SAMPLED,
                 "--choice", "yes,no,peut-être"])
    assert r.exit_code == 0, r.output
    assert _by_id(tmp_path / "choice")["default"]["output"] in ("yes", "no", "peut-être")


def test_a_default_that_does_not_compile_stops_the_job_before_any_work(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}')
    for args, message in [(["--json-schema", bad], f"--json-schema {bad}: the JSON schema cannot be compiled"),
                          (["--regex", "[a-"], "--regex: the regex cannot be compiled"),
                          (["--json-schema", tmp_path / "missing.json"], "cannot read the schema file"),
                          (["--regex", "a", "--choice", "a,b"], "at most one of --json-schema, --regex and --choice")]:
        r = run_cli(["--input", src, "--output", tmp_path / "out", "--model", llama_dir, *FAST, *args])
        assert r.exit_code != 0 and message in r.output, r.output
        assert not (tmp_path / "out" / "job.json").exists()  # OUT untouched: the fixed command just runs


@pytest.mark.slow
def test_data_parallel_workers_get_the_rows_structured_output_and_the_parent_makes_the_error_rows(tmp_path, llama_dir):
    rows = [{"id": f"r{i}", "prompt": f"row {i}", "response_format": RF} for i in range(6)]
    rows[3] = {"id": "bad", "prompt": "x", "response_format": {"type": "json_schema",
                                                               "json_schema": {"schema": {"type": "strin"}}}}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    base = ["--input", src, "--model", llama_dir, *FAST, *SAMPLED]
    r = run_cli([*base, "--output", tmp_path / "one"])
    assert r.exit_code == 0, r.output
    r = run_cli([*base, "--output", tmp_path / "two", "--data-parallel-size", "2"])
    assert r.exit_code == 0, r.output
    one, two = _by_id(tmp_path / "one"), _by_id(tmp_path / "two")
    assert {k: (v["output"], v["error"]) for k, v in two.items()} == {k: (v["output"], v["error"]) for k, v in one.items()}
    for k, row in two.items():
        if k == "bad":
            assert row["error"].startswith("field 'response_format': the JSON schema cannot be compiled")
        else:
            _valid(row)
