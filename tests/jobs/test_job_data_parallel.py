"""--data-parallel-size: worker processes fed on demand, one OUT, every row exactly once, failures fail fast."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl

from pagedbatch.io import check_exactly_once
from pagedbatch.jobs.data_parallel import plan_workers, visible_gpus
from pagedbatch.jobs.options import JobOptions

N = 60
# Two rows in flight per engine and a commit every two rows: a 60-row job runs
# for a few seconds, so there is time to stall or kill a worker mid-job.
SLOW = ["--max-in-flight", "2", "--max-num-seqs", "2", "--commit-every", "2", "--max-tokens", "16"]
DP2 = ["--data-parallel-size", "2"]
# Batch sizes and commit cadence change no row (only timing): references and reruns run at full speed.
FULL_SPEED = ["--max-in-flight", "64", "--max-num-seqs", "64"]
_WORKER_PART = re.compile(r"-w(\d+)-\d{6}\.parquet$")


def _rows():
    rows = prompts(N)
    rows[7] = {"id": "bad-temp", "prompt": "hi", "temperature": -1}  # error rows are dealt like any other
    rows[33] = '{"id": "broken", "prompt": '
    rows[40] = {"id": "chat", "messages": [{"role": "user", "content": "Say hello"}]}
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory, llama_dir):
    """The input, the common arguments and a single-process reference run's rows."""
    tmp = tmp_path_factory.mktemp("dp")
    src = write_jsonl(tmp / "in.jsonl", _rows())
    base = ["--input", src, "--model", llama_dir, *FAST, *SLOW]
    r = run_cli([*base, *FULL_SPEED, "--output", tmp / "ref"])
    assert r.exit_code == 0, r.output
    return base, _by_index(results(tmp / "ref"))


def _by_index(rows):
    return {row["index"]: (row["id"], row["output"], row["finish_reason"], row["error"], row["output_tokens"])
            for row in rows}


def _events(out) -> list[dict]:
    path = os.path.join(out, "progress-00000.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for(what, cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _completes_every_row_once_like_one_process(args, out, reference):
    r = run_cli([*args, "--output", out])
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    assert _by_index(results(out)) == reference  # greedy: the same tokens whichever engine ran a row


def _start(args):
    return subprocess.Popen(run_batch_cmd(args), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _worker_pids(out) -> dict[int, int]:
    """Worker index -> pid, from the latest run's start event (written once every worker is ready)."""
    starts = [e for e in _events(out) if e["event"] == "start" and e.get("workers")]
    return {w["worker"]: w["pid"] for w in starts[-1]["workers"]} if starts else {}


def _committed_by_worker(out) -> Counter:
    counts: Counter = Counter()
    d = os.path.join(out, "results")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        m = _WORKER_PART.search(name)
        if m and name.startswith("part-"):
            counts[int(m.group(1))] += pq.read_metadata(os.path.join(d, name)).num_rows
    return counts


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


# --- in one process: options and GPU placement -----------------------------------


def test_worker_i_gets_gpus_i_times_tp_to_i_plus_one_times_tp():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4)
    assert [s.cuda_visible_devices for s in plan_workers(2, 2, None, gpus, 64)] == ["4,5", "6,7"]
    assert [s.cuda_visible_devices for s in plan_workers("auto", 1, "cuda", gpus, 64)] == ["4", "5", "6", "7"]
    assert [s.cuda_visible_devices for s in plan_workers("auto", 2, None, visible_gpus({}, 8), 64)] == [
        "0,1", "2,3", "4,5", "6,7"]
    with pytest.raises(ValueError, match="needs 6 GPUs, but 4 are visible"):
        plan_workers(3, 2, None, gpus, 64)


def test_cpu_workers_split_the_cores_and_auto_means_one_without_a_gpu():
    slots = plan_workers(2, 1, None, [], 8)
    assert [(s.cuda_visible_devices, s.torch_threads) for s in slots] == [(None, 4), (None, 4)]
    assert len(plan_workers("auto", 1, None, [], 8)) == 1
    assert len(plan_workers(2, 1, "cpu", ["0", "1"], 3)) == 2  # --device cpu ignores the GPUs
    with pytest.raises(ValueError, match="no CUDA GPU"):
        plan_workers(2, 1, "cuda", [], 8)


def test_bad_data_parallel_size_is_refused_naming_the_option(tmp_path):
    assert JobOptions(input="x", data_parallel_size="auto").data_parallel_size == "auto"
    assert JobOptions(input="x", data_parallel_size="3").data_parallel_size == 3
    for bad in (0, "two", -1, True):
        with pytest.raises(ValueError, match="--data-parallel-size"):
            JobOptions(input="x", data_parallel_size=bad)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        JobOptions(input="x", data_parallel_size=2, device="cuda:1")
    r = run_cli(["--input", "x.jsonl", "--data-parallel-size", "many"])
    assert r.exit_code == 2 and "--data-parallel-size" in r.output


# --- real worker processes ----------------------------------------------------------


def test_two_workers_write_the_single_process_rows_each_index_once_with_a_row_per_worker_in_the_report(
        tmp_path, job):
    base, reference = job
    out = tmp_path / "out"
    _completes_every_row_once_like_one_process([*base, *DP2], out, reference)
    by_worker = _committed_by_worker(out)
    assert set(by_worker) == {0, 1} and sum(by_worker.values()) == N
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rows"]["total"] == N and report["rows"]["failed"] == 2
    workers = report["workers"]
    assert [(w["worker"], w["rows"], w["device"], w["status"]) for w in workers] == [
        (i, by_worker[i], "cpu", "done") for i in (0, 1)]
    assert all(w["output_tokens"] > 0 and w["output_tokens_per_s"] > 0 for w in workers)
    assert report["tokens"]["output"] == sum(w["output_tokens"] for w in workers)
    assert report["batching"]["steps"] > 0 and report["device_name"].startswith("2 x ")
    end = [e for e in _events(out) if e["event"] == "end"][-1]
    assert end["counters"]["rows"] == N  # the progress display counts every worker's rows
    assert "## Data-parallel workers" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_stalled_worker_holds_only_its_few_rows_while_the_other_does_the_rest(tmp_path, job):
    base, _ = job
    out = tmp_path / "out"
    proc = _start([*base, *DP2, "--max-tokens", "4", "--output", out])  # short rows: only dealing matters here
    pids = _wait_for("the workers to start", lambda: _worker_pids(out))
    os.kill(pids[1], signal.SIGSTOP)  # deterministic slowness: worker 1 asks for nothing more
    try:
        stalled = _committed_by_worker(out)[1]
        # Worker 1 holds at most max_in_flight (2) + one chunk (1) rows, plus one finished row
        # not yet committed; worker 0 must get every other row without waiting for it.
        _wait_for("worker 0 to do the rest", lambda: _committed_by_worker(out)[0] >= N - stalled - 4)
        assert proc.poll() is None  # the job waits for worker 1's rows
    finally:
        os.kill(pids[1], signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    assert _committed_by_worker(out)[1] <= stalled + 4


@pytest.mark.slow
def test_parent_sigkill_takes_the_workers_with_it_and_the_rerun_finishes_every_row_once(tmp_path, job):
    base, reference = job
    out = tmp_path / "out"
    proc = _start([*base, *DP2, "--output", out])
    pids = _wait_for("the workers to start", lambda: _worker_pids(out))
    _wait_for("a commit", lambda: sum(_committed_by_worker(out).values()) >= 6)
    proc.kill()
    proc.wait()
    # Orphans would commit rows that the rerun redoes: they must die with the parent.
    _wait_for("the workers to exit", lambda: all(_gone(pid) for pid in pids.values()), timeout=5)
    committed = sum(_committed_by_worker(out).values())
    assert committed < N
    time.sleep(0.5)
    assert sum(_committed_by_worker(out).values()) == committed  # nothing lands after the kill
    # A resume may change --data-parallel-size too.
    _completes_every_row_once_like_one_process([*base, *FULL_SPEED], out, reference)


@pytest.mark.slow
def test_a_killed_worker_fails_the_job_within_seconds_with_its_signal_and_the_rerun_completes(tmp_path, job):
    base, reference = job
    out = tmp_path / "out"
    proc = _start([*base, *DP2, "--output", out])
    pids = _wait_for("the workers to start", lambda: _worker_pids(out))
    _wait_for("a commit", lambda: sum(_committed_by_worker(out).values()) >= 6)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - killed_at < 10, "the job did not fail fast"
    assert proc.returncode == 1, stderr
    assert "worker 1" in stderr and "killed by SIGKILL" in stderr and "resume with the same command" in stderr
    partial = results(out)
    assert 0 < len(partial) < N and len({row["index"] for row in partial}) == len(partial)
    report = json.loads((out / "report.json").read_text())
    assert "failed" in report["status"]
    assert {w["worker"]: w["status"] for w in report["workers"]} == {0: "done", 1: "died"}
    assert _gone(pids[0])

    _completes_every_row_once_like_one_process([*base, *DP2, *FULL_SPEED], out, reference)


@pytest.mark.slow
def test_sigterm_to_the_parent_has_every_worker_commit_its_finished_rows_and_says_how_to_resume(tmp_path, job):
    base, reference = job
    out = tmp_path / "out"
    proc = _start([*base, *DP2, "--output", out])
    _wait_for("the workers to start", lambda: _worker_pids(out))
    _wait_for("a commit", lambda: sum(_committed_by_worker(out).values()) >= 4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "To resume, run the same command again" in stderr
    partial = results(out)
    assert 0 < len(partial) < N
    assert all(reference[i] == got for i, got in _by_index(partial).items())
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("partial") and "interrupted" in report["status"]
    assert report["rows"]["total"] == len(partial)
    # Both workers stopped cleanly and their counts add up to what was committed.
    assert [w["status"] for w in report["workers"]] == ["done", "done"]
    assert sum(w["rows"] for w in report["workers"]) == len(partial)


def test_a_sigterm_while_the_parent_writes_the_report_is_the_jobs_to_handle_and_the_job_ends_complete(
        tmp_path, job, monkeypatch):
    from pagedbatch.jobs import runner

    base, reference = job
    out = tmp_path / "out"
    original = runner.finish_job

    def finish_job(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, in this (the main) thread
        return original(*args, **kwargs)

    class KilledOutsideTheJob(Exception):
        pass

    def outside(signum, frame):  # stands in for SIGTERM's default action, which would end pytest itself
        raise KilledOutsideTheJob

    monkeypatch.setattr(runner, "finish_job", finish_job)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        r = run_cli([*base, *DP2, *FULL_SPEED, "--output", out])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 0 and r.exception is None, (r.exception, r.output)
    assert _by_index(results(out)) == reference
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def test_a_worker_that_cannot_load_the_model_stops_the_job_before_any_work(tmp_path, llama_dir):
    # config.json and the tokenizer are fine (the parent reads those), the weights are not.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in os.listdir(llama_dir):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(llama_dir, name), broken / name)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    started = time.monotonic()
    r = run_cli(["--input", src, "--output", tmp_path / "out", "--model", broken, *FAST, *DP2])
    assert r.exit_code == 1, r.output
    assert "could not load the model" in r.output and "worker" in r.output
    assert time.monotonic() - started < 60
    assert _committed_by_worker(tmp_path / "out") == Counter()
