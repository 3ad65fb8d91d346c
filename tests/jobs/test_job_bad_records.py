"""A file full of bad records: every record gets a row; errors name the field; --max-error-rate aborts."""
from __future__ import annotations

import json

from job_helpers import FAST, prompts, results, run_cli, write_jsonl

BAD = [
    {"id": "ok-0", "prompt": "hello there"},
    '{"id": "broken", "prompt": "no closing brace"',                       # malformed JSON
    {"id": "no-prompt", "text": "wrong column"},                           # missing prompt
    {"id": "int-prompt", "prompt": 42},                                    # wrong type
    {"id": "str-max", "prompt": "hi", "max_tokens": "many"},               # wrong type
    {"id": "bad-temp", "prompt": "hi", "temperature": -1},                 # invalid value
    {"id": "too-long", "prompt": "word " * 100},                           # longer than --max-model-len
    {"id": "empty", "prompt": ""},                                         # empty prompt
    {"id": "bad-msgs", "messages": []},                                    # empty chat
    {"id": "bad-ids", "prompt_token_ids": [1, 2, 99999999]},               # outside the vocabulary
    {"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"id": "ok-1", "prompt": "goodbye"},
]
EXPECT_IN_ERROR = {
    1: "JSON", 2: "prompt", 3: "'prompt'", 4: "max_tokens", 5: "temperature", 6: "max_tokens",
    7: "'prompt'", 8: "'messages'", 9: "prompt_token_ids", 10: "exactly one",
}


def test_every_bad_record_becomes_an_error_row_naming_the_problem(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--max-model-len", "64", *FAST])
    assert r.exit_code == 0, r.output
    rows = results(out)
    assert [row["index"] for row in rows] == list(range(len(BAD)))
    for row in rows:
        if row["index"] in (0, 11):
            assert row["finish_reason"] in ("stop", "length") and row["error"] is None
            continue
        assert row["finish_reason"] == "error" and row["output"] is None, row
        assert EXPECT_IN_ERROR[row["index"]] in row["error"], row["error"]
    assert rows[5]["id"] == "bad-temp" and rows[1]["id"] == "1"
    report = json.loads((out / "report.json").read_text())
    assert (report["rows"]["ok"], report["rows"]["failed"]) == (2, 10)
    assert "rows failed | 10" in (out / "report.md").read_text()
    # Only the prompts served count as tokens processed; the refused 100-word prompt does not.
    assert rows[6]["prompt_tokens"] > 64
    served = rows[0]["prompt_tokens"] + rows[11]["prompt_tokens"]
    assert report["tokens"]["prompt"] == served
    end = [json.loads(line) for line in open(next(out.glob("progress-*.jsonl")))][-1]
    assert end["event"] == "end" and end["counters"]["prompt_tokens"] == served


def test_max_error_rate_counts_rows_still_generating_so_early_failures_do_not_abort_a_healthy_job(tmp_path,
                                                                                                   llama_dir):
    # Every tenth record is bad. Bad records finish at once, good ones only after generating: over finished
    # records alone the first 20 were all failures ("57 of 57 failed" on a 1,000-row file) and a 0.5 limit
    # aborted a job whose error rate is 10%.
    rows = [{"id": f"bad{i}", "prompt": "x", "temperature": -1} if i % 10 == 0 else {"id": f"ok{i}", "prompt": f"p{i}"}
            for i in range(120)]
    src = write_jsonl(tmp_path / "tenth-bad.jsonl", rows)
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--max-error-rate", "0.5",
                 "--error-rate-min-rows", "5", *FAST])
    assert r.exit_code == 0, r.output
    written = results(out)
    assert len(written) == 120 and sum(row["finish_reason"] == "error" for row in written) == 12


def test_max_error_rate_aborts_with_a_clear_message_counting_the_records_taken_in(tmp_path, llama_dir):
    # The 40 bad rows finish as they are read while the 10 good ones are still generating: the abort is 40 of the
    # 50 rows taken in (80%); the message once said "40 of 40 rows failed (100.0%)", counting finished rows only.
    rows = prompts(10) + [{"id": f"bad{i}", "prompt": "x", "temperature": -1} for i in range(40)]
    src = write_jsonl(tmp_path / "mostly-bad.jsonl", rows)
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--max-error-rate", "0.2",
                 "--error-rate-min-rows", "20", *FAST])
    assert r.exit_code == 3, r.output
    assert "aborted" in r.output and "--max-error-rate" in r.output and "temperature" in r.output
    assert ("aborted: 40 of the 50 rows taken in failed (80.0%), above --max-error-rate 0.2; 10 of them were "
            "unfinished and were dropped. First errors:") in r.output
    written = results(out)
    assert 20 <= len(written) < len(rows)  # stopped early, finished rows kept
    assert len(written) == 40
    assert json.loads((out / "report.json").read_text())["status"].startswith("partial")


def test_an_openai_request_value_out_of_range_is_an_error_naming_the_body_field_the_request_wrote():
    from pagedbatch.io import InputRecord
    from pagedbatch.jobs.options import JobOptions
    from pagedbatch.jobs.prepare import RowPreparer

    preparer = RowPreparer(JobOptions(input="batch.jsonl"), "openai", None, lambda prompt: [1, 2])

    def error(url: str, body: dict) -> str:
        return preparer.prepare(InputRecord(0, {"custom_id": "a", "method": "POST", "url": url, "body": body},
                                            None)).error

    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    # Chat's top_logprobs is the engine's logprobs: the error named 'logprobs', a field the request does not have.
    got = error("/v1/chat/completions", {**chat, "top_logprobs": 25})
    assert got.startswith("field 'body.top_logprobs': invalid value: body.top_logprobs ") and "25" in got, got
    got = error("/v1/completions", {"prompt": "hi", "logprobs": 25})
    assert got.startswith("field 'body.logprobs': invalid value: body.logprobs ") and "25" in got, got
    got = error("/v1/completions", {"prompt": "hi", "temperature": -1})
    assert got.startswith("field 'body.temperature': invalid value: body.temperature must be >= 0"), got
    got = error("/v1/chat/completions", {**chat, "max_completion_tokens": 0})
    assert got.startswith("field 'body.max_completion_tokens': invalid value: body.max_completion_tokens "), got
