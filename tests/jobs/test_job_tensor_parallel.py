"""``run_batch.py --tensor-parallel-size 2``, alone and under ``--data-parallel-size 2``: the rows equal those of one process."""
from __future__ import annotations

import subprocess

import pytest
from job_helpers import FAST, REPO, prompts, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl


@pytest.mark.slow
def test_tp2_job_gives_the_same_greedy_rows_as_tp1(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    common = ["--input", src, "--model", llama_dir, "--include-token-ids", *FAST]
    r = run_cli([*common, "--output", tmp_path / "tp1"])
    assert r.exit_code == 0, r.output
    proc = subprocess.run(run_batch_cmd([*common, "--output", tmp_path / "tp2", "--tensor-parallel-size", "2"]),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    def rows(out):
        return sorted((r["id"], r["output_token_ids"], r["output"], r["finish_reason"]) for r in results(out))

    assert rows(tmp_path / "tp2") == rows(tmp_path / "tp1")
    assert len(rows(tmp_path / "tp2")) == 12


@pytest.mark.slow
def test_data_and_tensor_parallel_combine_dp2_tp2_rows_equal_one_process(tmp_path, llama_dir):
    # Two data-parallel workers, each an engine split over two ranks: four processes on the CPU.
    src = write_jsonl(tmp_path / "in.jsonl", prompts(16))
    common = ["--input", src, "--model", llama_dir, "--include-token-ids", *FAST]
    r = run_cli([*common, "--output", tmp_path / "one"])
    assert r.exit_code == 0, r.output
    proc = subprocess.run(run_batch_cmd([*common, "--output", tmp_path / "dp2tp2", "--data-parallel-size", "2",
                                         "--tensor-parallel-size", "2"]),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    def rows(out):
        return sorted((r["index"], r["output_token_ids"], r["output"], r["finish_reason"]) for r in results(out))

    assert rows(tmp_path / "dp2tp2") == rows(tmp_path / "one")
    assert [r[0] for r in rows(tmp_path / "dp2tp2")] == list(range(16))
