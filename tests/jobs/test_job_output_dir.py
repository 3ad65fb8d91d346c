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


def test_a_second_run_on_an_out_in_use_stops_before_work_and_overwrite_spares_running_shards(tmp_path, llama_dir):
    # Two runs of one shard would both skip the same committed rows and answer the rest twice (a second launch
    # wrote 4,000 rows for a 2,000-row input, all "complete"). Here the test holds shard 0's lock as a running
    # job would; any other open file of the lock conflicts, in this process as in another.
    from pagedbatch.jobs.out_lock import OutputLock

    src = write_jsonl(tmp_path / "a.jsonl", prompts(4))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST]
    with OutputLock(str(out), 0):
        r = run_cli(args)
        assert r.exit_code == 1, r.output
        assert f"is in use: process {os.getpid()} is running this job there now" in r.output
        assert "Nothing was done" in r.output and not (out / "results").exists()
        # Shard 1 of two runs beside it.
        assert run_cli([*args, "--num-shards", "2", "--shard-index", "1"]).exit_code == 0
    assert run_cli(args).exit_code == 1  # two shards vs one: another job, but no longer for the lock
    assert run_cli([*args, "--num-shards", "2", "--shard-index", "0"]).exit_code == 0
    assert len(results(out)) == 4
    with OutputLock(str(out), 1):
        r = run_cli([*args, "--overwrite"])
        assert r.exit_code == 1 and "--overwrite would delete the results of shard 1 of this job" in r.output
        assert len(results(out)) == 4
    assert run_cli([*args, "--overwrite"]).exit_code == 0 and len(results(out)) == 4


def test_output_lock_is_released_when_its_holder_ends(tmp_path):
    import subprocess
    import sys

    from pagedbatch.jobs.out_lock import OutputLock, OutputLocked

    out = str(tmp_path / "o")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pagedbatch.jobs.out_lock import OutputLock; "
                               f"OutputLock({out!r}, 3).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"process {holder.pid} is running this job \\(shard 3\\)"):
            OutputLock(out, 3).acquire()
        with OutputLock(out, 2):  # another shard's lock is free
            pass
    finally:
        holder.kill()  # as SIGKILL or a crash would: the kernel drops the lock with the process
        holder.wait()
    with OutputLock(out, 3):
        pass
