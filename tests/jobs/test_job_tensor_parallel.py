"""``run_batch.py --tensor-parallel-size 2``, alone and under ``--data-parallel-size 2``: the rows equal those of one process."""
from __future__ import annotations

import subprocess

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
