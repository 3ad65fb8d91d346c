"""`run_batch.py --executor ray` as a user runs it: the command starts (and stops) its own local Ray cluster.

A module of its own so that no Ray session of another test module is alive.
"""
from __future__ import annotations

import json
import subprocess

import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl

from pagedbatch.io import check_exactly_once


@pytest.mark.slow
def test_the_command_starts_a_local_ray_cluster_and_writes_the_local_jobs_rows(tmp_path, llama_dir):
    pytest.importorskip("ray", reason='the Ray tests need ray: pip install "pagedbatch[ray]"')
    n = 12
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    base = ["--input", src, "--model", llama_dir, *FAST]
    assert run_cli([*base, "--output", tmp_path / "local"]).exit_code == 0
    proc = subprocess.run(run_batch_cmd([*base, "--output", tmp_path / "ray", "--executor", "ray",
                                         "--data-parallel-size", "auto", "--max-in-flight", "4"]),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert check_exactly_once(str(tmp_path / "ray" / "results"), range(n)) == ([], [])
    key = lambda rows: {r["index"]: (r["output"], r["output_tokens"]) for r in rows}  # noqa: E731
    assert key(results(tmp_path / "ray")) == key(results(tmp_path / "local"))
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert report["status"] == "complete" and report["device_name"].startswith("Ray: 1 actor(s)")  # auto: 1 on CPU
