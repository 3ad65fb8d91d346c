"""n samples per record in the job runner: --n and a per-row n give one row per sample (sample_index), sample j
being what a separate n=1 row seeded sample_seed(seed, j) gives; the error-row rule; OpenAI choices;
generate_dataset; admission counted in samples; exactly once across SIGKILL + resume, resumed data parallel."""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections import defaultdict
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl

from pagedbatch.io import check_exactly_once
from pagedbatch.jobs.options import JobOptions
from pagedbatch.jobs.prepare import Pending, Prepared
from pagedbatch.jobs.replica import Replica, drive
from pagedbatch.sampling_params import SamplingParams, sample_seed

# FAST samples greedily; a later --temperature wins.
SAMPLED = ["--temperature", "0.9", "--include-token-ids", "--max-num-seqs", "8"]
N = 4


def _records() -> list[dict]:
    rows = [{"id": f"r{i}", "prompt": p["prompt"], "seed": 100 + i, "topic": f"t{i}"} for i, p in enumerate(prompts(4))]
    rows[1]["n"] = 2  # a row's own n wins over --n
    rows[2]["temperature"] = 0  # greedy: its samples are all the same
    return rows + [
        {"id": "zero", "prompt": "x", "n": 0, "topic": "t4"},  # never a request: one error row
        {"id": "text", "prompt": "x", "n": "many"},
        {"id": "wide", "prompt": "x", "n": 9},  # above --max-num-seqs 8
        {"id": "long", "prompt": "x", "max_tokens": 1000, "topic": "t7"},  # the engine fails it: one row per sample
    ]


def _samples_per_record(rows: list[dict]) -> dict[int, int]:
    return {i: r.get("n", N) for i, r in enumerate(rows[:4])}


def _by_key(rows: list[dict]) -> dict[tuple[int, int], dict]:
    return {(row["index"], row["sample_index"]): row for row in rows}


@pytest.fixture(scope="module")
def n_job(tmp_path_factory, llama_dir):
    """The --n 4 job's rows and report, and the same samples asked for as separate n=1 rows."""
    tmp = tmp_path_factory.mktemp("n")
    records = _records()
    out = tmp / "out"
    r = run_cli(["--input", write_jsonl(tmp / "in.jsonl", records), "--output", out, "--model", llama_dir, *FAST,
                 *SAMPLED, "--n", N, "--keep-columns", "topic"])
    assert r.exit_code == 0, r.output
    # Sample j of record i as its own row, seeded sample_seed(seed_i, j): the copies the n samples must equal.
    copies, keys = [], []
    for i, n in _samples_per_record(records).items():
        for j in range(n):
            copies.append({**records[i], "n": 1, "seed": sample_seed(records[i]["seed"], j)})
            keys.append((i, j))
    r2 = run_cli(["--input", write_jsonl(tmp / "copies.jsonl", copies), "--output", tmp / "copies",
                  "--model", llama_dir, *FAST, *SAMPLED])
    assert r2.exit_code == 0, r2.output
    by_copy = {keys[row["index"]]: row for row in results(tmp / "copies")}
    return r.output, out, results(out), by_copy


def test_n4_gives_4_distinct_rows_per_record_each_equal_to_a_separate_run_seeded_sample_seed(n_job):
    _, _, rows, by_copy = n_job
    got = _by_key(rows)
    for i in (0, 3):
        samples = [tuple(got[i, j]["output_token_ids"]) for j in range(N)]
        assert len(set(samples)) == N, f"record {i}'s samples are not distinct"
    assert {k: (got[k]["output"], got[k]["output_token_ids"]) for k in by_copy} == \
        {k: (c["output"], c["output_token_ids"]) for k, c in by_copy.items()}
    assert all(got[k]["id"] == f"r{k[0]}" for k in by_copy)


def test_greedy_n4_gives_4_identical_samples_and_a_rows_own_n_overrides_the_job_default(n_job):
    _, _, rows, _ = n_job
    got = _by_key(rows)
    assert len({tuple(got[2, j]["output_token_ids"]) for j in range(N)}) == 1 and got[2, 0]["output_tokens"] > 0
    assert sorted(j for i, j in got if i == 1) == [0, 1]


def test_a_record_that_never_becomes_a_request_is_one_error_row_and_an_engine_failure_one_per_sample(n_job):
    _, _, rows, _ = n_job
    per_index = defaultdict(list)
    for row in rows:
        per_index[row["index"]].append(row)
    for i, expected in ((4, "field 'n': invalid value: n must be >= 1"), (5, "field 'n' must be an integer"),
                        (6, "field 'n': 9 samples exceed max_num_seqs (8)")):
        (row,) = per_index[i]
        assert row["sample_index"] == 0 and row["finish_reason"] == "error" and row["error"].startswith(expected), row
    long = per_index[7]
    assert [row["sample_index"] for row in long] == [0, 1, 2, 3]
    assert all(row["finish_reason"] == "error" and "exceeds the model's maximum length" in row["error"]
               for row in long)


def test_carried_columns_repeat_on_every_sample_row_and_the_report_counts_rows_and_records(n_job):
    output, out, rows, _ = n_job
    assert all(row["topic"] == f"t{row['index']}" for row in rows if row["index"] not in (5, 6))
    assert [row["topic"] for row in rows if row["index"] == 7] == ["t7"] * N
    total = N + 2 + N + N + 3 + N
    assert len(rows) == total and f"done: {total} rows (8 records) this run ({3 + N} error rows in 4 records" in output
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["total"] == total and report["rows"]["failed"] == 3 + N
    assert report["records"] == {"total": 8, "ok": 4, "failed": 4}
    # A record's samples share its prompt: it counts once, where it was served (not in error rows).
    assert report["tokens"]["prompt"] == sum(row["prompt_tokens"] or 0 for row in rows
                                             if row["sample_index"] == 0 and row["finish_reason"] != "error")
    assert report["tokens"]["output"] == sum(row["output_tokens"] for row in rows)
    assert json.loads((out / "job.json").read_text())["settings"]["sampling"]["n"] == N


def test_max_error_rate_counts_records_not_sample_rows():
    from pagedbatch.jobs.progress import Counters
    from pagedbatch.jobs.replica import error_rate_exceeded

    opts = JobOptions(input="x", max_error_rate=0.5, error_rate_min_rows=3)
    c = Counters()
    c.add_record([{"finish_reason": "error", "prompt_tokens": 5}] * 4)  # the engine failed all 4 samples
    c.add_record([{"finish_reason": "stop", "prompt_tokens": 2, "output_tokens": 3}])
    assert not error_rate_exceeded(opts, c)  # too few records yet
    c.add_record([{"finish_reason": "length", "prompt_tokens": 2, "output_tokens": 3}])
    assert (c.errors, c.rows, c.failed_records, c.records) == (4, 6, 1, 3)
    assert not error_rate_exceeded(opts, c)  # 1 of 3 records, though 4 of 6 rows
    assert c.prompt_tokens == 4 and c.output_tokens == 6  # the failed record's prompt was not served and c.describe_rows() == "6 rows (3 records)"
    c.add_record([{"finish_reason": "error", "prompt_tokens": 1}])
    c.add_record([{"finish_reason": "error", "prompt_tokens": 1}])
    assert error_rate_exceeded(opts, c)  # 3 of 5 finished records
    # Over the records taken in: 3 of 5 finished failed, 2 more still generating: 3 of 7, under 0.5.
    assert not error_rate_exceeded(opts, c, taken=7) and error_rate_exceeded(opts, c, taken=5)
    assert error_rate_exceeded(opts, c, taken=2)  # never below the finished count


def test_n_above_max_num_seqs_or_below_one_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"n \(--n\) 300 exceeds max_num_seqs \(--max-num-seqs\) 256"):
        JobOptions(input="x", n=300)
    with pytest.raises(ValueError, match="n must be >= 1"):
        JobOptions(input="x", n=0)
    assert JobOptions(input="x", n=8, max_num_seqs=8).default_sampling() == {"n": 8}


def test_openai_batch_lines_with_body_n_get_n_choices_in_one_output_line(tmp_path, llama_dir):
    body = {"model": "x", "prompt": "Hello", "max_tokens": 4, "temperature": 0.9, "seed": 5}
    reqs = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {**body, "n": 2}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 3}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": body},
        {"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {**body, "max_tokens": 1000, "n": 2}},
    ]
    out = tmp_path / "out"
    r = run_cli(["--input", write_jsonl(tmp_path / "batch.jsonl", reqs), "--output", out, "--model", llama_dir,
                 *FAST, "--output-format", "jsonl"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b", "c", "d"]
    rows = _by_key(results(out))
    a = lines[0]["response"]["body"]
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["text"] for c in a["choices"]] == [rows[0, 0]["output"], rows[0, 1]["output"]]
    assert a["usage"] == {"prompt_tokens": rows[0, 0]["prompt_tokens"],
                          "completion_tokens": rows[0, 0]["output_tokens"] + rows[0, 1]["output_tokens"],
                          "total_tokens": rows[0, 0]["prompt_tokens"] + rows[0, 0]["output_tokens"]
                          + rows[0, 1]["output_tokens"]}
    b = lines[1]["response"]["body"]
    assert b["object"] == "chat.completion" and [c["index"] for c in b["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" for c in b["choices"])
    # Sample 0 of an n=2 request is the n=1 request with the same seed.
    assert lines[2]["response"]["body"]["choices"] == [{**a["choices"][0]}]
    assert lines[3]["response"] is None and "maximum length" in lines[3]["error"]["message"]


def test_generate_dataset_with_n_returns_one_row_per_sample_joined_to_its_input_row(tmp_path, llama_dir):
    import datasets

    import pagedbatch

    ds = datasets.Dataset.from_dict({"topic": ["cats", None, "owls"], "label": [1, 2, 3]})
    got = pagedbatch.generate_dataset(ds, output_dir=str(tmp_path / "gen"), model=llama_dir,
                                      prompt_template="Tell me about {{ topic }}.", n=2, device="cpu",
                                      kv_cache_memory_gb=0.05, max_tokens=6, temperature=0.9, seed=3, quiet=True)
    assert list(zip(got["index"], got["sample_index"])) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    assert got["topic"] == ["cats", "cats", None, "owls", "owls"] and got["label"] == [1, 1, 2, 3, 3]
    assert got[2]["error"] == "template: field 'topic' is null"
    assert got[0]["output"] != got[1]["output"]


# --- admission and grouping, over a stand-in engine ---------------------------------


class _Engine:
    """Finishes one sample per step, the newest sample of the oldest request first (out of order)."""

    def __init__(self):
        self.requests: dict[str, list[int]] = {}
        self.held_after_add: list[tuple[int, int]] = []  # (samples held before, after) each admission

    def held(self) -> int:
        return sum(len(v) for v in self.requests.values())

    def add_request(self, request_id, token_ids, params):
        before = self.held()
        self.requests[request_id] = list(range(params.n))
        self.held_after_add.append((before, self.held()))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self):
        rid = next(iter(self.requests))
        j = self.requests[rid].pop()
        if not self.requests[rid]:
            del self.requests[rid]
        timings = SimpleNamespace(queue_s=0.0, ttft_s=0.0, latency_s=0.0)
        return [SimpleNamespace(request_id=rid, sample_index=j, finished=True, finish_reason="length", error=None,
                                text=f"{rid}.{j}", prompt_tokens=2, output_tokens=1, timings=timings, tpot_s=0.0,
                                num_preemptions=0, prompt_token_ids=[1, 2], token_ids=[3], logprobs=None)]

    def stats(self) -> dict:
        return {}


class _Parts:
    def __init__(self):
        self.parts: list[list[dict]] = [[]]

    def add(self, row: dict) -> None:
        self.parts[-1].append(row)

    def pending(self) -> int:
        return len(self.parts[-1])

    def commit(self):
        self.parts.append([])
        return "part"


def test_max_in_flight_counts_samples_and_a_records_rows_reach_one_part_together_in_sample_order():
    opts = JobOptions(input="x", max_in_flight=5, commit_every=1)
    engine, parts = _Engine(), _Parts()
    rep = Replica(opts, engine, parts, on_commit=lambda *_: None)
    ns = [3, 1, 4, 2, 3, 1]
    items = [Prepared([1, 2], SamplingParams(n=n), Pending(i, str(i), None, False, "field 'prompt'", n=n))
             for i, n in enumerate(ns)]

    def commit_after_each_step() -> bool:
        rep.maybe_commit()  # commit_every 1: a part whenever a row is waiting
        return True

    assert drive(rep, iter(items), 5, commit_after_each_step)
    # Admitted only while fewer than 5 samples were in the engine, and whole.
    assert all(before < 5 for before, _ in engine.held_after_add)
    assert max(after for _, after in engine.held_after_add) > max(ns)  # records did run side by side
    assert rep.samples_in_flight == 0 and not rep.in_flight
    written = [p for p in parts.parts if p]
    per_part = [{row["index"] for row in part} for part in written]
    assert sorted(i for indices in per_part for i in indices) == list(range(len(ns)))  # each record in one part
    for part in written:
        assert [row["sample_index"] for row in part] == list(range(ns[part[0]["index"]]))
    assert rep.counters.records == len(ns) and rep.counters.rows == sum(ns)


# --- exactly once across SIGKILL + resume (then data parallel) -------------------------

RECORDS = 45
# One record (3 samples) in the engine at a time and a commit every 2 records: slow enough to kill mid-job.
KILLABLE = ["--n", "3", "--temperature", "0.8", "--seed", "11", "--max-tokens", "12", "--commit-every", "6",
            "--max-in-flight", "3", "--max-num-seqs", "3"]
# Batch sizes change no sample (seeded sampling is per request): references and resumes run at full speed.
FULL_SPEED = ["--max-in-flight", "48", "--max-num-seqs", "48"]


@pytest.fixture(scope="module")
def killable(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("n-kill")
    rows = prompts(RECORDS)
    rows[5]["n"] = 2
    rows[9] = {"id": "bad", "prompt": "x", "n": -1}
    base = ["--input", write_jsonl(tmp / "in.jsonl", rows), "--model", llama_dir, *FAST, *KILLABLE]
    r = run_cli([*base, "--output", tmp / "ref", *FULL_SPEED])
    assert r.exit_code == 0, r.output
    return base, _by_key(results(tmp / "ref"))


def _n_parts(out) -> int:
    d = os.path.join(out, "results")
    return len([f for f in os.listdir(d) if f.startswith("part-")]) if os.path.isdir(d) else 0


def _start(args):
    return subprocess.Popen(run_batch_cmd(args), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_a_commit(proc, out, before: int) -> bool:
    """True once the job committed a new part; False when it exited first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _n_parts(out) > before:
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the job committed nothing in time")


def _every_sample_once_and_records_whole(out, reference) -> None:
    assert check_exactly_once(str(out / "results"), range(RECORDS)) == ([], [])
    rows = results(out)
    assert len(rows) == len(reference) and _by_key(rows).keys() == reference.keys()
    assert {k: r["output"] for k, r in _by_key(rows).items()} == {k: r["output"] for k, r in reference.items()}
    seen: dict[int, str] = {}
    for part in (out / "results").glob("part-*.parquet"):
        for index in set(pq.read_table(part, columns=["index"]).column(0).to_pylist()):
            assert index not in seen, f"record {index} is split over {seen.get(index)} and {part.name}"
            seen[index] = part.name


@pytest.mark.slow
def test_sigkill_at_random_moments_then_a_data_parallel_resume_gives_every_sample_of_every_record_once(
        tmp_path, killable):
    base, reference = killable
    out = tmp_path / "out"
    rng = random.Random(7)
    kills = 0
    for _ in range(2):
        proc = _start([*base, "--output", out])
        if not _wait_for_a_commit(proc, out, _n_parts(out)):
            break
        time.sleep(rng.uniform(0.0, 0.3))  # mid-step, mid-commit, between commits
        proc.kill()
        proc.wait()
        kills += 1
    assert kills == 2, "the job finished before it could be killed twice"
    assert 0 < len(results(out)) < len(reference)
    # The resume deals the rest to two worker processes, each committing its own parts.
    r = run_cli([*base, *FULL_SPEED, "--data-parallel-size", "2", "--output", out])
    assert r.exit_code == 0, r.output
    _every_sample_once_and_records_whole(out, reference)
    assert any("-w1-" in p.name for p in (out / "results").glob("part-*.parquet"))
