"""--prompt-template, --system-prompt and --keep-columns in whole jobs: every input format, error rows that
name the field, carried columns with their Arrow types, one schema across parts, resume and data parallel."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, results, run_cli, write_jsonl

from pagedbatch.io import check_exactly_once

TEMPLATE = "Summarise for {{ meta.audience }} ({{ words }} words, tags {{ tags }}, draft {{ draft }}):\n{{ article }}"
SCHEMA = pa.schema([
    ("id", pa.string()), ("article", pa.string()), ("words", pa.int64()), ("score", pa.float64()),
    ("draft", pa.bool_()),
    ("tags", pa.list_(pa.string())), ("meta", pa.struct([("audience", pa.string()), ("year", pa.int64())])),
    ("max_tokens", pa.int64()),
])


def _rows(count: int = 8) -> list[dict]:
    rows = [{"id": f"a{i}", "article": f"cats {i} sleep", "words": 10 + i, "score": i / 4, "draft": i % 2 == 0,
             "tags": ["x", f"t{i}"], "meta": {"audience": "kids", "year": 2000 + i}, "max_tokens": None}
            for i in range(count)]
    rows[2]["article"] = None  # a null field the template prints
    rows[4]["meta"] = {"audience": None, "year": 2004}  # a null nested field
    rows[5]["max_tokens"] = 2  # a row's own sampling field still wins
    return rows


@pytest.fixture(scope="module")
def parquet_job(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("templates")
    src = tmp / "in.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(), schema=SCHEMA), src, row_group_size=3)
    args = ["--input", src, "--model", llama_dir, *FAST, "--prompt-template", TEMPLATE, "--include-prompt"]
    out = tmp / "out"
    r = run_cli([*args, "--output", out, "--keep-columns", "all"])
    assert r.exit_code == 0, r.output
    return tmp, args, out, {row["index"]: row for row in results(out)}


def test_a_template_over_parquet_fields_makes_each_prompt_and_names_null_fields_in_error_rows(parquet_job):
    _, _, _, rows = parquet_job
    assert rows[0]["prompt"] == 'Summarise for kids (10 words, tags ["x", "t0"], draft true):\ncats 0 sleep'
    assert rows[1]["prompt"].startswith("Summarise for kids (11 words") and "draft false" in rows[1]["prompt"]
    assert rows[2]["finish_reason"] == "error" and rows[2]["error"] == "template: field 'article' is null"
    assert rows[4]["error"] == "template: field 'meta.audience' is null"
    assert rows[5]["output_tokens"] <= 2 and rows[0]["output_tokens"] == 8
    assert sum(r["finish_reason"] == "error" for r in rows.values()) == 2


def test_carried_columns_keep_their_arrow_types_and_error_rows_keep_them_too(parquet_job):
    _, _, out, rows = parquet_job
    schema = ds.dataset(str(out / "results")).schema
    for name in ("article", "words", "score", "draft", "tags", "meta", "max_tokens"):
        assert schema.field(name).type == SCHEMA.field(name).type, name
    assert schema.field("input_id").type == pa.string()  # named like a result column: renamed
    assert rows[2]["meta"] == {"audience": "kids", "year": 2002} and rows[2]["article"] is None
    assert rows[4]["tags"] == ["x", "t4"] and rows[4]["words"] == 14 and rows[4]["input_id"] == "a4"
    manifest = json.loads((out / "job.json").read_text())["settings"]
    assert manifest["prompt_template"] == TEMPLATE and "meta: struct<audience: string, year: int64>" in \
        manifest["carried_columns"]


def test_a_resumed_job_from_a_yaml_file_writes_parts_of_one_schema(parquet_job, tmp_path):
    tmp, args, _, reference = parquet_job
    out = tmp_path / "out"
    r = run_cli([*args, "--output", out, "--keep-columns", "words,meta,tags", "--max-rows", "3"])
    assert r.exit_code == 0, r.output
    job = tmp_path / "job.yaml"
    # The same job, from a YAML job file: a multi-line template and a list of columns.
    job.write_text("prompt_template: |-\n  " + TEMPLATE.replace("\n", "\n  ") +
                   "\nkeep_columns: [words, meta, tags]\ninclude_prompt: true\n")
    r = run_cli(["--config", job, "--input", tmp / "in.parquet", "--output", out, "--model", args[3], *FAST])
    assert r.exit_code == 0, r.output
    parts = sorted((out / "results").glob("part-*.parquet"))
    assert len(parts) == 2 and pq.read_schema(parts[0]) == pq.read_schema(parts[1])
    table = ds.dataset(str(out / "results")).to_table()
    assert table.num_rows == 8 and table.schema.names[-3:] == ["words", "meta", "tags"]
    assert check_exactly_once(str(out / "results"), range(8)) == ([], [])
    assert {r["index"]: r["output"] for r in results(out)} == {i: r["output"] for i, r in reference.items()}


def test_jsonl_template_with_a_system_prompt_and_carried_columns_of_inferred_types(tmp_path, llama_dir,
                                                                                  monkeypatch):
    from pagedbatch.io import carried

    monkeypatch.setattr(carried, "SAMPLE_ROWS", 3)  # types are inferred from the first 3 records
    rows = [{"topic": "cats", "level": 1, "extra": {"k": [1, 2]}},
            {"topic": "dogs", "level": 2, "extra": {"k": []}, "temperature": 0.5, "seed": 3},
            {"level": 3, "extra": {"k": [3]}},  # no topic
            {"topic": "fish", "level": "high", "extra": {"k": [4]}}]  # a level that does not fit int64
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, *FAST, "--include-prompt",
                 "--prompt-template", "Write about {{ topic }} at level {{ level }}.", "--system-prompt", "Be brief.",
                 "--keep-columns", "level,extra"])
    assert r.exit_code == 0, r.output
    by = {row["index"]: row for row in results(out)}
    assert json.loads(by[0]["prompt"]) == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Write about cats at level 1."}]
    assert by[0]["error"] is None and by[1]["error"] is None
    assert by[2]["error"] == "template: field 'topic' is missing from the record"
    assert by[3]["error"].startswith("keep column 'level': str 'high' does not fit the column's type int64")
    assert [by[i]["level"] for i in range(4)] == [1, 2, 3, None]
    assert [by[i]["extra"] for i in range(4)] == [{"k": [1, 2]}, {"k": []}, {"k": [3]}, {"k": [4]}]
    schema = pq.read_schema(next((out / "results").glob("part-*.parquet")))
    assert schema.field("level").type == pa.int64() and schema.field("extra").type == pa.struct(
        [("k", pa.list_(pa.int64()))])


def _csv(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,topic,year\n1,cats,2020\n2,,2021\n")
    return path


def _hf_disk(tmp_path):
    import datasets

    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"id": [1, 2], "topic": ["cats", None], "year": [2020, 2021]}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("make, year_type", [(_csv, pa.string()), (_hf_disk, pa.int64())], ids=["csv", "hf-disk"])
def test_templates_and_carried_columns_work_on_csv_and_datasets_folders(tmp_path, llama_dir, make, year_type):
    out = tmp_path / "out"
    r = run_cli(["--input", make(tmp_path), "--output", out, "--model", llama_dir, *FAST,
                 "--prompt-template", "About {{ topic }} in {{ year }}", "--keep-columns", "all"])
    assert r.exit_code == 0, r.output
    by = {row["index"]: row for row in results(out)}
    assert by[0]["error"] is None and by[1]["error"] == "template: field 'topic' is null"
    assert [by[i]["year"] for i in (0, 1)] == ([2020, 2021] if year_type == pa.int64() else ["2020", "2021"])
    assert pq.read_schema(next((out / "results").glob("part-*.parquet"))).field("year").type == year_type
    assert by[1]["id"] == "2" and by[1]["input_id"] in (2, "2")


def test_options_that_cannot_apply_are_refused_before_any_work_naming_the_option(tmp_path, llama_dir):
    openai = write_jsonl(tmp_path / "batch.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                                    "body": {"prompt": "hi"}}])
    r = run_cli(["--input", openai, "--output", tmp_path / "o1", "--prompt-template", "{{ body }}"])
    assert r.exit_code == 1
    assert "prompt_template (--prompt-template) does not apply to an OpenAI batch input" in r.output
    r = run_cli(["--input", openai, "--output", tmp_path / "o2", "--prompt-template", "{{ body "])
    assert r.exit_code == 2 and "prompt_template (--prompt-template): the Jinja2 template does not parse" in r.output
    r = run_cli(["--input", openai, "--output", tmp_path / "o3", "--prompt-template-file", tmp_path / "none.j2"])
    assert r.exit_code == 2 and "prompt_template_file (--prompt-template-file): cannot read" in r.output
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), parquet)
    r = run_cli(["--input", parquet, "--output", tmp_path / "o4", "--model", llama_dir, "--keep-columns", "prompt,x"])
    assert r.exit_code == 1 and "keep_columns (--keep-columns): 'x' not in the input" in r.output
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_two_data_parallel_workers_write_the_single_process_rows_with_template_and_carried_columns(
        parquet_job, tmp_path):
    _, args, ref_out, reference = parquet_job
    out = tmp_path / "out"
    r = run_cli([*args, "--output", out, "--keep-columns", "all", "--data-parallel-size", "2",
                 "--max-in-flight", "2", "--max-num-seqs", "2"])
    assert r.exit_code == 0, r.output
    assert results(out) == [reference[i] | {"shard": 0, **_timings(row)} for i, row in enumerate(results(out))]
    assert ds.dataset(str(out / "results")).schema == ds.dataset(str(ref_out / "results")).schema


def _timings(row: dict) -> dict:
    # Only the timings of a row may differ between runs.
    return {k: row[k] for k in ("queue_s", "ttft_s", "latency_s", "tpot_s", "num_preemptions")}


@pytest.mark.parametrize("options, message", [
    ({"prompt_template": "a", "prompt_template_file": "t.j2"}, "give one of prompt_template (--prompt-template) and"),
    ({"prompt_template": "{% if %}"}, "prompt_template (--prompt-template): the Jinja2 template does not parse"),
    ({"keep_columns": "all,id"}, "keep_columns (--keep-columns): 'all' cannot be combined"),
    ({"keep_columns": ["a", "a"]}, "keep_columns (--keep-columns) names a column twice"),
    ({"keep_columns": 3}, "keep_columns (--keep-columns) must be 'all' or a list"),
    ({"revision": "v2"}, "revision (--revision) needs model (--model)"),
    ({"tokenizer_revision": "v2"}, "tokenizer_revision (--tokenizer-revision) needs tokenizer"),
    ({"system_prompt": 3}, "system_prompt (--system-prompt) must be a string"),
])
def test_the_new_options_are_checked_when_job_options_are_built_naming_the_option(options, message):
    from pagedbatch.jobs.options import JobOptions

    with pytest.raises(ValueError) as e:
        JobOptions(input="in.jsonl", **options)
    assert message in str(e.value)
    assert JobOptions(input="in.jsonl", keep_columns=" a, b").keep_columns == ["a", "b"]


def test_a_utf8_bom_at_the_start_of_a_template_file_is_not_part_of_the_template(tmp_path):
    from pagedbatch.jobs.options import JobOptions

    path = tmp_path / "t.j2"
    path.write_bytes("\ufeffSay: {{ article }}\n".encode("utf-8"))  # as Windows editors save "UTF-8"
    assert JobOptions(input="in.jsonl", prompt_template_file=str(path)).template_text == "Say: {{ article }}\n"
