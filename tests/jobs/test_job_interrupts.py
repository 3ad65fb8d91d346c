"""Real processes: SIGKILL at random moments then resume; SIGTERM; the demo quickstart."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl

from pagedbatch.io import check_exactly_once

# Two rows in flight, so a 200-row job takes a few seconds and commits every 5 rows.
SLOW_JOB = ["--commit-every", "5", "--max-in-flight", "2", "--max-num-seqs", "2", "--max-tokens", "16"]


def _n_parts(out) -> int:
    d = os.path.join(out, "results")
    return len([f for f in os.listdir(d) if f.startswith("part-")]) if os.path.isdir(d) else 0


def _start_and_wait_for_commit(args, out, timeout=60.0):
    """Start the job; return (process, finished) once it committed a new part (or exited)."""
    before = _n_parts(out)
    proc = subprocess.Popen(run_batch_cmd(args), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, True
        if _n_parts(out) > before:
            return proc, False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the job committed nothing in time")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, llama_dir):
    n = 200
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    base = ["--input", src, "--model", llama_dir, *FAST, *SLOW_JOB]
    ref_out = tmp_path / "ref"
    assert run_cli([*base, "--output", ref_out]).exit_code == 0
    reference = {row["index"]: (row["output"], row["output_tokens"]) for row in results(ref_out)}

    out = tmp_path / "out"
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        proc, finished = _start_and_wait_for_commit([*base, "--output", out], out)
        if finished:
            break
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: mid-step, mid-commit, between commits
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 3, "the job finished before it could be killed three times"
    assert len(results(out)) < n
    done = subprocess.run(run_batch_cmd([*base, "--output", out]), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert check_exactly_once(str(out / "results"), range(n)) == ([], [])
    got = {row["index"]: (row["output"], row["output_tokens"]) for row in results(out)}
    assert got == reference
    assert not [f for f in os.listdir(out / "results") if f.startswith(".tmp-")]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rows"]["total"] == n and report["time"]["runs"] >= 4


@pytest.mark.slow
def test_sigterm_commits_finished_rows_writes_a_partial_report_and_says_how_to_resume(tmp_path, llama_dir):
    n = 120
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST, *SLOW_JOB]
    proc, finished = _start_and_wait_for_commit(args, out)
    assert not finished
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "To resume, run the same command again" in stderr
    assert "run_batch.py" in stderr.split("To resume")[1]
    partial = results(out)
    assert 0 < len(partial) < n
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("partial") and "interrupted" in report["status"]
    assert report["rows"]["total"] == len(partial)

    done = subprocess.run(run_batch_cmd(args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert check_exactly_once(str(out / "results"), range(n)) == ([], [])
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_demo_quickstart_runs_on_a_fresh_cache_and_prints_the_notice(tmp_path):
    from pagedbatch.demo import DEMO_NOTICE

    out = tmp_path / "out"
    proc = subprocess.run(run_batch_cmd(["--input", "examples/prompts.jsonl", "--output", out, "--max-tokens", "8"]),
                          cwd=REPO, env=subprocess_env(PAGEDBATCH_CACHE_DIR=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert DEMO_NOTICE in proc.stderr
    n = sum(1 for line in open(REPO / "examples" / "prompts.jsonl") if line.strip())
    rows = results(out)
    assert len(rows) == n and all(row["error"] is None for row in rows)
    assert (out / "report.md").exists() and (out / "report.png").exists()
