"""``run_batch.py --tensor-parallel-size 2``, alone and under ``--data-parallel-size 2``: the rows equal those of one
process; a stuck worker fails the job like a dead one (finished rows kept, resumable)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl


def _rows(out):
    return sorted((r["index"], r["output_token_ids"], r["output"], r["finish_reason"]) for r in results(out))


def _job_rows(tmp_path, llama_dir, n: int, parallel: list[str]) -> tuple[list, list]:
    """(rows of one process, rows with the ``parallel`` options run as a user would, in a subprocess)."""
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    common = ["--input", src, "--model", llama_dir, "--include-token-ids", *FAST]
    r = run_cli([*common, "--output", tmp_path / "one"])
    assert r.exit_code == 0, r.output
    proc = subprocess.run(run_batch_cmd([*common, "--output", tmp_path / "par", *parallel]),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return _rows(tmp_path / "one"), _rows(tmp_path / "par")


@pytest.mark.slow
def test_tp2_job_gives_the_same_greedy_rows_as_tp1(tmp_path, llama_dir):
    one, tp2 = _job_rows(tmp_path, llama_dir, 12, ["--tensor-parallel-size", "2"])
    assert tp2 == one
    assert len(tp2) == 12


@pytest.mark.slow
def test_data_and_tensor_parallel_combine_dp2_tp2_rows_equal_one_process(tmp_path, llama_dir):
    # Two data-parallel workers, each an engine split over two ranks: four processes on the CPU.
    one, par = _job_rows(tmp_path, llama_dir, 16, ["--data-parallel-size", "2", "--tensor-parallel-size", "2"])
    assert par == one
    assert [r[0] for r in par] == list(range(16))


@pytest.mark.slow
def test_a_stuck_tp_worker_fails_the_job_naming_it_keeping_finished_rows_and_the_rerun_completes(
        tmp_path, llama_dir, monkeypatch):
    from pagedbatch.engine import tp_workers

    groups = []

    def start_and_keep(*args, **kw):
        groups.append(real_start(*args, **kw))
        return groups[-1]

    real_start = tp_workers.start_tensor_parallel
    monkeypatch.setattr(tp_workers, "start_tensor_parallel", start_and_keep)
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "in.jsonl", prompts(24))
    args = ["--input", src, "--model", llama_dir, "--output", out, *FAST, "--tensor-parallel-size", "2",
            "--max-num-seqs", "2", "--commit-every", "4", "--tp-timeout-s", "2"]

    def committed() -> bool:
        return (out / "results").is_dir() and any(n.startswith("part-") for n in os.listdir(out / "results"))

    def stop_worker_after_a_commit():
        deadline = time.monotonic() + 60
        while not committed() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(groups[0].workers.pids[0], signal.SIGSTOP)

    stopper = threading.Thread(target=stop_worker_after_a_commit)
    stopper.start()
    r = run_cli(args)
    stopper.join()
    assert r.exit_code == 1, r.output
    assert "failed: WorkerStuckError: tensor-parallel worker stuck" in r.output and "rank 1 (pid" in r.output
    assert "resume with the same command" in r.output
    assert 4 <= len(results(out)) < 24
    assert json.loads((out / "report.json").read_text())["status"] != "complete"
    monkeypatch.undo()
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert sorted(row["index"] for row in results(out)) == list(range(24))
