"""--executor ray and pagedbatch.ray.Generate on a local CPU Ray cluster: the local job's rows, exactly once."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.io import check_exactly_once

N = 40
# Eight rows per actor batch, so the rows spread over batches (and actors).
RAY = ["--executor", "ray", "--data-parallel-size", "2", "--max-in-flight", "8"]


def _rows():
    rows = prompts(N)
    rows[3] = {"id": "bad-temp", "prompt": "hi", "temperature": -1}
    rows[17] = '{"id": "broken", "prompt": '
    rows[25] = {"id": "chat", "messages": [{"role": "user", "content": "Say hello"}]}
    return rows


def _by_index(rows):
    return {row["index"]: (row["id"], row["output"], row["finish_reason"], row["error"], row["output_tokens"])
            for row in rows}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='the Ray tests need ray: pip install "pagedbatch[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, llama_dir):
    """The JSONL input, the common arguments and the single-process job's rows."""
    tmp = tmp_path_factory.mktemp("ray")
    src = write_jsonl(tmp / "in.jsonl", _rows())
    base = ["--model", llama_dir, *FAST, "--max-tokens", "12"]
    r = run_cli(["--input", src, "--output", tmp / "ref", *base])
    assert r.exit_code == 0, r.output
    return src, base, _by_index(results(tmp / "ref"))


@pytest.mark.slow
def test_ray_executor_writes_the_single_process_rows_each_index_once(tmp_path, ray_cluster, job):
    src, base, reference = job
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, *base, *RAY])
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    assert _by_index(results(out)) == reference  # bad records are the same error rows
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rows"]["total"] == N and report["rows"]["failed"] == 2
    assert report["device_name"].startswith("Ray: 2 actor(s)")
    workers = report["workers"]
    assert workers and sum(w["rows"] for w in workers) == N
    assert all(w["worker"].startswith("actor-") and w["device"] == "cpu" and w["status"] == "done" for w in workers)
    assert report["batching"]["steps"] > 0


@pytest.mark.slow
def test_ray_reads_parquet_folders_and_csv_with_the_local_jobs_indices(tmp_path, ray_cluster, job):
    _, base, reference = job
    rows = prompts(12)  # row i is the reference input's row i, but for the reference's bad row 3
    folder = tmp_path / "pq"
    folder.mkdir()
    # Two files: the second file's rows are numbered after the first's, as the local job does.
    pq.write_table(pa.Table.from_pylist(rows[:5]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), folder / "b.parquet")
    table = tmp_path / "in.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt"])
        w.writeheader()
        w.writerows(rows)
        f.write("bad,row,with too many cells\n")  # an error row at index 12
    for src, n in ((folder, 12), (table, 13)):
        out = tmp_path / f"{src.name}-out"
        r = run_cli(["--input", src, "--output", out, *base, *RAY, "--commit-every", "5"])
        assert r.exit_code == 0, r.output
        assert check_exactly_once(str(out / "results"), range(n)) == ([], [])
        got = _by_index(results(out))
        assert {i: got[i] for i in range(12) if i != 3} == {i: reference[i] for i in range(12) if i != 3}
    assert got[12][2] == "error" and "columns" in got[12][3]


@pytest.mark.slow
def test_sigterm_stops_the_ray_job_at_a_batch_and_the_resume_skips_every_committed_index(tmp_path, ray_cluster, job,
                                                                                          monkeypatch):
    src, base, reference = job
    out = tmp_path / "out"
    slow = [*RAY, "--max-in-flight", "2", "--max-num-seqs", "2", "--commit-every", "2"]

    # The driver's handler runs in this (the main) thread, at the next bytecode after the kill.
    _after_the_first_commit(monkeypatch, lambda committed: os.kill(os.getpid(), signal.SIGTERM))
    r = run_cli(["--input", src, "--output", out, *base, *slow])
    assert r.exit_code == 143, r.output
    assert "interrupted by SIGTERM" in r.output and "To resume, run the same command again" in r.output
    partial = results(out)
    assert 0 < len(partial) < N and all(reference[i] == got for i, got in _by_index(partial).items())
    assert json.loads((out / "report.json").read_text())["status"] == "partial (shard 0: interrupted)"

    r = run_cli(["--input", src, "--output", out, *base, *RAY])
    assert r.exit_code == 0, r.output
    assert f"{N - len(partial)} rows this run" in r.output and f"{len(partial)} committed earlier" in r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    assert _by_index(results(out)) == reference


def _actor_pids() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"MapBatches(JobActor)" in f.read():
                    pids.append(int(pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError, ValueError):
            continue
    return pids


@pytest.mark.slow
def test_a_sigterm_while_the_ray_job_writes_its_report_ends_it_complete_not_by_rays_exit(tmp_path, ray_cluster, job,
                                                                                          monkeypatch):
    # ray.init installs a SIGTERM handler that calls sys.exit(15); the job's own handler must hold until the end.
    from pagedbatch.jobs import runner

    src, base, _ = job
    out = tmp_path / "out"
    original = runner.finish_job

    def finish_job(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, in this (the main) thread
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "finish_job", finish_job)
    r = run_cli(["--input", src, "--output", out, *base, *RAY])
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def _after_the_first_commit(monkeypatch, action) -> None:
    """Run ``action(rows committed)`` once, in the driver's (main) thread, right after the job's first part is
    committed. A watcher thread polling the results folder raced the job: on an idle machine warm actors ran
    the whole job between two polls, and a SIGTERM that landed after the driver had restored Ray's handler
    ended the test with Ray's ``sys.exit(15)``."""
    from pagedbatch.jobs import ray_executor

    original = ray_executor._Driver._commit
    fired: list[bool] = []

    def commit(self) -> None:
        original(self)
        if not fired and any(p.startswith("part-") for p in os.listdir(self.writer.results_dir)):
            fired.append(True)
            action(len(results(self.opts.output)))

    monkeypatch.setattr(ray_executor._Driver, "_commit", commit)


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, llama_dir):
    """A job long enough to be killed in the middle of: 3x the rows, 2x the tokens, and its single-process rows.
    On a loaded 2-core CI machine the 40-row job ended before a watcher thread could act on its first commit."""
    tmp = tmp_path_factory.mktemp("ray-long")
    src = write_jsonl(tmp / "in.jsonl", prompts(N_LONG))
    base = ["--model", llama_dir, *FAST, "--max-tokens", "24"]
    r = run_cli(["--input", src, "--output", tmp / "ref", *base])
    assert r.exit_code == 0, r.output
    return src, base, _by_index(results(tmp / "ref"))


N_LONG = 3 * N


@pytest.mark.slow
def test_an_actor_killed_mid_job_is_retried_by_ray_and_every_row_is_committed_once(tmp_path, ray_cluster, long_job,
                                                                                    monkeypatch):
    src, base, reference = long_job
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_actor(committed: int) -> None:
        pids = _actor_pids()
        assert pids, "no engine actor is running after the first commit"
        os.kill(pids[0], signal.SIGKILL)
        killed.append(committed)  # rows committed when it died

    _after_the_first_commit(monkeypatch, kill_one_actor)
    # Two in flight, 2 per batch, a commit per batch: the first commit comes after the first batch.
    r = run_cli(["--input", src, "--output", out, *base, *RAY, "--max-in-flight", "2", "--max-num-seqs", "2",
                 "--commit-every", "2"])
    assert killed, "no actor was killed: the job committed no part"
    assert killed[0] < N_LONG  # it died mid-job: Ray restarted it and reran its batch
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N_LONG)) == ([], [])
    assert _by_index(results(out)) == reference


@pytest.mark.slow
def test_ray_executor_with_n_samples_commits_every_sample_of_every_record_once(tmp_path, ray_cluster, job):
    src, base, reference = job
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, *base, *RAY, "--n", "2"])
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    rows = results(out)
    keys = [(row["index"], row["sample_index"]) for row in rows]
    bad = {i for i, ref in reference.items() if ref[2] == "error"}  # never requests: one error row each
    assert keys == sorted((i, j) for i in range(N) for j in range(1 if i in bad else 2))
    # Greedy: both samples are the single-process n=1 row.
    assert all(_by_index([row])[row["index"]] == reference[row["index"]] for row in rows)
    assert f"{2 * N - len(bad)} rows ({N} records) this run" in r.output


def test_the_ray_driver_takes_a_record_whole_across_split_batches_and_drops_a_repeat_whole(tmp_path):
    import io

    from pagedbatch.io.carried import CarriedColumns
    from pagedbatch.jobs.options import JobOptions
    from pagedbatch.jobs.ray_executor import _META, _RECORD_ROWS, _WORKER, _Driver

    driver = _Driver(JobOptions(input="x", output=str(tmp_path), quiet=True), "jsonl", CarriedColumns(), {7},
                     io.StringIO(), "run", 1)
    schema = driver.writer.schema.append(pa.field(_WORKER, pa.string())).append(pa.field(_META, pa.string())).append(
        pa.field(_RECORD_ROWS, pa.int64()))

    def batch(*rows):
        return pa.Table.from_pylist([{"index": i, "sample_index": j, "output": f"{i}.{j}{tag}",
                                      "finish_reason": "length", _WORKER: "actor-a", _RECORD_ROWS: n}
                                     for i, j, n, tag in rows], schema=schema)

    driver._take(batch((0, 0, 3, ""), (0, 1, 3, ""), (1, 0, 1, "")))  # Ray split record 0's rows over two blocks
    assert driver.writer.pending() == 1  # record 1 only: record 0 is not whole yet
    driver._take(batch((0, 2, 3, ""), (1, 0, 1, "again"), (7, 0, 1, "")))  # 1 repeated, 7 committed before
    driver._take(batch((0, 0, 3, "again"), (0, 1, 3, "again"), (0, 2, 3, "again")))  # a retried batch: all dropped
    driver._take(batch((2, 1, 2, ""), (2, 0, 2, "")))
    driver._commit()
    got = [(row["index"], row["sample_index"], row["output"]) for row in results(tmp_path)]
    assert got == [(0, 0, "0.0"), (0, 1, "0.1"), (0, 2, "0.2"), (1, 0, "1.0"), (2, 0, "2.0"), (2, 1, "2.1")]
    assert driver.repeats == 5 and driver.counters.records == 3 and driver.counters.rows == 6


@pytest.mark.slow
def test_generate_in_a_user_pipeline_adds_the_output_columns_to_each_row(ray_cluster, job, llama_dir):
    import pagedbatch.ray

    _, _, reference = job
    items = [{"prompt": prompts(N)[i]["prompt"], "keep": i} for i in (0, 1, 2, 5, 8)] + [{"prompt": "", "keep": -1}]
    ds = ray_cluster.data.from_items(items)
    ds = ds.map_batches(pagedbatch.ray.Generate,
                        fn_constructor_kwargs={"model": llama_dir, "device": "cpu", "kv_cache_memory_gb": 0.05,
                                               "temperature": 0, "max_tokens": 12, "include_token_ids": True},
                        batch_size=4, batch_format="pyarrow", concurrency=1)
    out = sorted(ds.take_all(), key=lambda row: row["keep"])
    assert [row["keep"] for row in out] == [-1, 0, 1, 2, 5, 8]
    bad, good = out[0], out[1:]
    assert bad["finish_reason"] == "error" and "empty" in bad["error"] and bad["output"] is None
    for row in good:
        ref = reference[row["keep"]]
        assert (row["output"], row["finish_reason"], row["output_tokens"]) == (ref[1], ref[2], ref[4])
        assert len(row["output_token_ids"]) == row["output_tokens"] and row["prompt_tokens"] > 0


def test_generate_with_n_repeats_each_input_row_once_per_sample(llama_dir):
    import numpy as np

    from pagedbatch.ray import Generate

    gen = Generate(llama_dir, device="cpu", kv_cache_memory_gb=0.05, temperature=0.9, seed=1, max_tokens=4, n=2)
    table = pa.table({"prompt": ["Hello", "", "AI is"], "keep": [0, 1, 2], "n": [None, None, 3]})
    out = gen(table).to_pylist()
    assert [(row["keep"], row["sample_index"]) for row in out] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert out[2]["finish_reason"] == "error" and out[0]["output"] != out[1]["output"]
    as_dict = gen({"prompt": np.array(["Hello", "AI is"], dtype=object), "keep": np.array([0, 2])})
    assert list(as_dict["keep"]) == [0, 0, 2, 2] and list(as_dict["output"]) == [out[0]["output"], out[1]["output"],
                                                                                   out[3]["output"], out[4]["output"]]


def test_generate_refuses_job_only_options_naming_them():
    from pagedbatch.ray import Generate

    with pytest.raises(ValueError, match="unknown option.*max_rows"):
        Generate(None, max_rows=3)
    with pytest.raises(ValueError, match="temperature"):
        Generate(None, temperature=-1.0)


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch, llama_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    r = run_cli(["--input", src, "--output", tmp_path / "out", "--model", llama_dir, *FAST, "--executor", "ray"])
    assert r.exit_code == 1 and 'pip install "pagedbatch[ray]"' in r.output


def test_ray_executor_refuses_inputs_it_cannot_read_and_ray_address_without_it(tmp_path, llama_dir):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_list(prompts(2)).save_to_disk(str(d))
    r = run_cli(["--input", d, "--output", tmp_path / "out", "--model", llama_dir, *FAST, "--executor", "ray"])
    assert r.exit_code == 1 and "--executor ray reads jsonl, openai, parquet, csv" in r.output
    r = run_cli(["--input", d, "--ray-address", "auto"])
    assert r.exit_code == 2 and "--executor ray" in r.output


@pytest.mark.slow
def test_ray_renders_templates_in_its_actors_and_carries_columns_with_the_local_jobs_schema(
        tmp_path, ray_cluster, llama_dir):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"topic": ["cats", None, "owls"], "k": pa.array([1, 2, 3], pa.int32()),
                             "meta": [{"a": [1]}, {"a": []}, {"a": [3]}]}), src)
    base = ["--input", src, "--model", llama_dir, *FAST, "--prompt-template", "{{ k }} facts on {{ topic }}",
            "--keep-columns", "k,meta"]
    r = run_cli([*base, "--output", tmp_path / "local"])
    assert r.exit_code == 0, r.output
    r = run_cli([*base, "--output", tmp_path / "ray", "--executor", "ray"])
    assert r.exit_code == 0, r.output
    local, ray_rows = results(tmp_path / "local"), results(tmp_path / "ray")
    keep = ("index", "output", "error", "k", "meta")
    assert [{k: row[k] for k in keep} for row in ray_rows] == [{k: row[k] for k in keep} for row in local]
    assert ray_rows[1]["error"] == "template: field 'topic' is null"
    schema = pq.read_schema(next((tmp_path / "ray" / "results").glob("part-*.parquet")))
    assert schema == pq.read_schema(next((tmp_path / "local" / "results").glob("part-*.parquet")))
