"""OUT's manifest: resume skips committed rows; another job's OUT stops before work; --overwrite; YAML files."""
from __future__ import annotations

import os

import pytest
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.jobs.options import JobOptions, load_job_file, slurm_shard


def _parts(out):
    return sorted(os.listdir(out / "results"))


def test_rerun_resumes_and_other_jobs_are_refused_before_work(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(6))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST]
    assert run_cli(args).exit_code == 0
    before = _parts(out)

    again = run_cli(args)  # the same command: nothing left to do
    assert again.exit_code == 0 and "0 rows this run" in again.output
    assert len(results(out)) == 6

    other = write_jsonl(tmp_path / "b.jsonl", prompts(7))
    r = run_cli(["--input", other, "--output", out, "--model", llama_dir, *FAST])
    assert r.exit_code == 1 and "holds the results of another job" in r.output and "input differs" in r.output
    r = run_cli([*args, "--temperature", "0.5"])
    assert r.exit_code == 1 and "sampling.temperature was 0.0, now 0.5" in r.output and "--overwrite" in r.output
    assert _parts(out)[: len(before)] == before and len(results(out)) == 6

    r = run_cli(["--input", other, "--output", out, "--model", llama_dir, "--overwrite", *FAST])
    assert r.exit_code == 0, r.output
    assert len(results(out)) == 7 and not set(_parts(out)) & set(before)


def test_bad_model_path_and_missing_input_stop_at_once(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(2))
    r = run_cli(["--input", src, "--output", tmp_path / "o1", "--model", tmp_path / "nope", *FAST])
    assert r.exit_code == 1 and "model directory not found" in r.output
    assert not (tmp_path / "o1").exists()
    r = run_cli(["--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o2", "--model", llama_dir, *FAST])
    assert r.exit_code == 1 and "input not found" in r.output


def test_yaml_job_file_merges_under_the_command_line(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(3))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {src}\nmodel: {llama_dir}\nmax_tokens: 2\ntemperature: 0\nmax-rows: 2\n")
    out = tmp_path / "out"
    r = run_cli(["--config", cfg, "--output", out, "--max-tokens", "3", "--quiet", "--kv-cache-memory-gb", "0.05"])
    assert r.exit_code == 0, r.output
    rows = results(out)
    assert len(rows) == 2 and max(row["output_tokens"] for row in rows) == 3
    cfg.write_text("input: x.jsonl\ntemprature: 0\n")
    r = run_cli(["--config", cfg])
    assert r.exit_code == 2 and "unknown option(s) temprature" in r.output


def test_shipped_configs_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    for name in ("cpu_demo.yaml", "qwen2.5-7b-h100.yaml", "llama3-8b-slurm.yaml"):
        values = load_job_file(os.path.join(root, name))
        values.setdefault("input", "x.jsonl")
        opts = JobOptions(**values)
        opts.engine_config(opts.model or "demo")


def test_shards_default_from_slurm():
    assert slurm_shard({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (2, 4)
    assert slurm_shard({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert slurm_shard({}) == (None, None)
    with pytest.raises(ValueError, match="shard_index must be < num_shards"):
        JobOptions(input="x", shard_index=3, num_shards=3)
    with pytest.raises(ValueError, match="temperature"):
        JobOptions(input="x", temperature=-1.0)
