"""End-to-end `run` on every input format: one row per record, the documented schema."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.engine.token_bytes import TokenBytes
from pagedbatch.engine.tokenizer import load_tokenizer
from pagedbatch.io import check_exactly_once

BASE_COLUMNS = {
    "index": pa.int64(), "id": pa.string(), "output": pa.string(), "finish_reason": pa.string(),
    "error": pa.string(), "prompt_tokens": pa.int64(), "output_tokens": pa.int64(), "queue_s": pa.float64(),
    "ttft_s": pa.float64(), "latency_s": pa.float64(), "tpot_s": pa.float64(),
}

ROWS = prompts(10) + [
    {"id": "chat", "messages": [{"role": "user", "content": "Say hello"}]},
    {"id": "short", "prompt": "The quick brown fox", "max_tokens": 3},
]


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("jsonl")
    src = write_jsonl(tmp / "in.jsonl", ROWS)
    out = tmp / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, *FAST])
    assert r.exit_code == 0, r.output
    return out, {row["index"]: row for row in results(out)}


def test_jsonl_job_writes_each_record_once_with_the_documented_schema(jsonl_run):
    out, by_index = jsonl_run
    schema = ds.dataset(str(out / "results")).schema
    for name, typ in BASE_COLUMNS.items():
        assert schema.field(name).type == typ, name
    assert check_exactly_once(str(out / "results"), range(len(ROWS))) == ([], [])
    assert sorted(by_index) == list(range(len(ROWS)))
    for i, row in by_index.items():
        assert row["id"] == ROWS[i]["id"]
        assert row["finish_reason"] in ("stop", "length") and row["error"] is None
        assert isinstance(row["output"], str)
        assert row["prompt_tokens"] > 0 and 1 <= row["output_tokens"] <= 8
        assert row["latency_s"] >= row["ttft_s"] >= row["queue_s"] >= 0
    assert by_index[11]["output_tokens"] <= 3  # the row's own max_tokens wins
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == {"total": 12, "ok": 12, "failed": 0, "finish_reasons": report["rows"]["finish_reasons"]}
    assert report["status"] == "complete"
    assert report["latency"]["latency_s"]["p50"] > 0
    assert report["kv_cache"]["peak_used_blocks"] > 0
    assert (out / "report.md").read_text().startswith("# pagedbatch job report")
    assert (out / "report.png").stat().st_size > 1000
    assert json.loads((out / "job.json").read_text())["settings"]["sampling"]["temperature"] == 0


def _write_parquet(tmp, rows):
    path = tmp / "in.parquet"
    keys = ["id", "prompt", "messages", "max_tokens"]  # from_pylist takes the columns of the first row only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def _write_csv(tmp, rows):
    import csv

    path = tmp / "in.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "messages", "max_tokens"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["id"], "prompt": r.get("prompt", ""),
                        "messages": json.dumps(r["messages"]) if "messages" in r else "",
                        "max_tokens": r.get("max_tokens", "")})
    return path


def _write_hf_disk(tmp, rows):
    import datasets

    path = tmp / "hf"
    keys = ["id", "prompt", "messages", "max_tokens"]
    datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("writer", [_write_parquet, _write_csv, _write_hf_disk], ids=["parquet", "csv", "hf-disk"])
def test_other_formats_give_the_same_greedy_rows_as_jsonl(writer, tmp_path, llama_dir, jsonl_run):
    _, expected = jsonl_run
    src = writer(tmp_path, ROWS)
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, *FAST])
    assert r.exit_code == 0, r.output
    got = results(out)
    assert [row["index"] for row in got] == list(range(len(ROWS)))
    for row in got:
        want = expected[row["index"]]
        assert (row["id"], row["output"], row["finish_reason"]) == (want["id"], want["output"], want["finish_reason"])


def test_openai_batch_file_in_openai_batch_output_out(tmp_path, llama_dir):
    reqs = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "x", "prompt": "Hello", "max_tokens": 4}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "x", "prompt": "Bye", "temperature": -2}},
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2,
                  "max_tokens": 6, "ignore_eos": True}},
        {"custom_id": "e", "method": "POST", "url": "/v1/completions",
         "body": {"model": "x", "prompt": "Hello", "logprobs": 1, "max_tokens": 5, "ignore_eos": True, "n": 2,
                  "temperature": 1.0, "seed": 3}},
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", reqs)
    out = tmp_path / "out"
    # --include-logprobs fills the Parquet column for every row; only rows that asked get OpenAI logprobs.
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--output-format", "jsonl",
                 "--include-logprobs", "--include-token-ids", *FAST])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b", "c", "d", "e"]
    assert lines[0]["response"]["body"]["object"] == "text_completion"
    assert lines[0]["response"]["body"]["model"] == os.path.abspath(llama_dir)  # the model that answered
    assert lines[0]["response"]["body"]["usage"]["completion_tokens"] <= 4
    assert lines[1]["response"]["body"]["object"] == "chat.completion"
    assert [x["response"]["body"]["choices"][0]["logprobs"] for x in lines[:2]] == [None, None]
    assert lines[2]["response"] is None and "temperature" in lines[2]["error"]["message"]

    # The OpenAI logprobs objects: the chosen tokens' logprobs are the Parquet column's, tokens the output's ids.
    rows = {(row["id"], row["sample_index"]): row for row in results(out)}
    tb = TokenBytes(load_tokenizer(llama_dir))
    chat = lines[3]["response"]["body"]["choices"][0]
    content, row = chat["logprobs"]["content"], rows[("d", 0)]
    assert [bytes(e["bytes"]) for e in content] == [tb(t) for t in row["output_token_ids"]]
    assert [e["logprob"] for e in content] == pytest.approx(row["logprobs"], abs=1e-6)
    assert [len(e["top_logprobs"]) for e in content] == [2] * 6
    choices = lines[4]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c in choices:
        lp, row = c["logprobs"], rows[("e", c["index"])]
        assert lp["tokens"] == [tb.text(t) for t in row["output_token_ids"]]
        assert lp["token_logprobs"] == pytest.approx(row["logprobs"], abs=1e-6)
        assert all(1 <= len(top) <= 2 and tok in top for top, tok in zip(lp["top_logprobs"], lp["tokens"]))
        assert lp["text_offset"][0] == 0 and len(lp["text_offset"]) == 5


def test_include_options_add_prompt_token_ids_and_logprobs(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3) + [{"messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--include-prompt", "--include-token-ids",
                 "--include-logprobs", *FAST])
    assert r.exit_code == 0, r.output
    rows = results(out)
    assert rows[0]["prompt"] == prompts(3)[0]["prompt"]
    assert json.loads(rows[3]["prompt"]) == [{"role": "user", "content": "x"}]
    assert rows[3]["id"] == "3"
    for row in rows:
        assert len(row["prompt_token_ids"]) == row["prompt_tokens"]
        assert len(row["output_token_ids"]) == row["output_tokens"] == len(row["logprobs"])
        assert all(lp <= 0 for lp in row["logprobs"])


def test_a_repeated_custom_id_in_an_openai_batch_file_is_an_error_row_in_every_shard_and_run(tmp_path, llama_dir):
    # OpenAI refuses such a file; we answered both, so output.jsonl held two lines under one id.
    def req(cid, prompt):
        return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, "max_tokens": 3}}

    src = write_jsonl(tmp_path / "batch.jsonl", [req("a", "Hi"), req("b", "Yo"), req("a", "Hey"), req(5, "x"),
                                                 req("5", "y")])
    for shards in (1, 2):
        out = tmp_path / f"out{shards}"
        for k in range(shards):
            r = run_cli(["--input", src, "--output", out, "--model", llama_dir, *FAST, "--num-shards", str(shards),
                         "--shard-index", str(k)])
            assert r.exit_code == 0, r.output
        rows = results(out)
        assert [row["finish_reason"] == "error" for row in rows] == [False, False, True, False, True]
        assert "'a' is already the custom_id of the request at index 0" in rows[2]["error"]
        assert "'5' is already the custom_id of the request at index 3" in rows[4]["error"]


def test_an_id_field_named_on_purpose_and_found_in_no_record_is_a_usage_error(tmp_path, llama_dir):
    # A typo in --id-field numbered every row silently; the default name "id" may be absent (rows get indices).
    src = write_jsonl(tmp_path / "a.jsonl", [{"key": "k1", "prompt": "hi"}, {"key": "k2", "prompt": "yo"}])
    r = run_cli(["--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST, "--id-field", "kye"])
    assert r.exit_code == 2 and "id_field (--id-field) 'kye' is in no record" in r.output and "key" in r.output
    assert not (tmp_path / "o").exists()
    assert run_cli(["--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST, "--id-field", "key"]
                   ).exit_code == 0
    assert [row["id"] for row in results(tmp_path / "o")] == ["k1", "k2"]
    assert run_cli(["--input", src, "--output", tmp_path / "o2", "--model", llama_dir, *FAST]).exit_code == 0
    assert [row["id"] for row in results(tmp_path / "o2")] == ["0", "1"]


def test_an_id_field_typo_is_refused_past_the_first_thousand_records_and_a_late_first_id_is_found(
        tmp_path, llama_dir):
    # JSONL has no schema: the field names came from a 1,000-record sample, and past it a typo was accepted.
    rows = [{"prompt": f"p{i}", **({"key": f"k{i}"} if i >= 1200 else {})} for i in range(1201)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    r = run_cli(["--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST, "--id-field", "kye"])
    assert r.exit_code == 2 and "id_field (--id-field) 'kye' is in no record" in r.output, r.output
    r = run_cli(["--input", src, "--output", tmp_path / "o2", "--model", llama_dir, *FAST, "--id-field", "key",
                 "--max-rows", "1"])
    assert r.exit_code == 0, r.output


def test_report_png_leaves_a_users_pyplot_backend_and_figures_alone(jsonl_run):
    # A job run from a notebook (the dataset API) must not switch its pyplot backend or leave figures open.
    import subprocess
    import sys

    out, _ = jsonl_run
    code = (
        "import json, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from pagedbatch.jobs.report import write_png\n"
        f"write_png(json.load(open({str(out / 'report.json')!r})), {str(out)!r})\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    os.remove(out / "report.png")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["svg", "0"]
    with open(out / "report.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
