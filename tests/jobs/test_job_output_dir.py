"""OUT's manifest: resume skips committed rows; another job's OUT stops before work; --overwrite; YAML files."""
from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_a_model_that_fails_to_load_leaves_no_manifest_so_the_corrected_command_is_a_new_job(tmp_path, llama_dir):
    # The manifest is written before the model loads; it used to stay, and the rerun with the right --model
    # was refused as "another job" although nothing had run.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    src = write_jsonl(tmp_path / "a.jsonl", prompts(3))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli(["--input", src, "--output", out, "--model", broken, *FAST])
    assert r.exit_code == 1 and "could not load the model" in r.output, r.output
    assert sorted(p for p in os.listdir(out) if not p.startswith(".lock-")) == ["notes.txt"]
    r = run_cli(["--input", src, "--output", out, "--model", llama_dir, *FAST])
    assert r.exit_code == 0, r.output
    assert len(results(out)) == 3


def test_an_output_directory_inside_the_input_directory_is_refused_before_work(tmp_path, llama_dir):
    # Its parts would be read back as input rows (the input's fingerprint changed and no rerun could resume).
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), data / "x.parquet")
    for out in (data / "out", data):
        r = run_cli(["--input", data, "--output", out, "--model", llama_dir, *FAST])
        assert r.exit_code == 1 and "is inside the input directory" in r.output, r.output
    assert sorted(os.listdir(data)) == ["x.parquet"]
    assert run_cli(["--input", data, "--output", tmp_path / "out", "--model", llama_dir, *FAST]).exit_code == 0


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


def test_job_file_values_of_the_wrong_type_are_usage_errors_naming_the_option(tmp_path, llama_dir):
    # From YAML a quoted "false" is a string: include_prompt: "false" added the prompt column, and a
    # quoted number failed deep in the engine with a TypeError traceback.
    src = write_jsonl(tmp_path / "a.jsonl", prompts(2))
    cfg = tmp_path / "job.yaml"
    for text, message in (('include_prompt: "false"', "include_prompt (--include-prompt) must be true or false, "
                                                        "got 'false'"),
                          ('max_num_seqs: "64"', "max_num_seqs (--max-num-seqs) must be an integer (or null), got '64'"),
                          ("json_schema: 5", "json_schema (--json-schema) must be a string or a mapping"),
                          ("prompt_template: 5", "prompt_template (--prompt-template) must be a string"),
                          ("stop_token_ids: [1, two]", "stop_token_ids (--stop-token-ids) must be a list of integers")):
        cfg.write_text(f"{text}\n")
        r = run_cli(["--config", cfg, "--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST])
        assert r.exit_code == 2 and message in r.output, (text, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    # A schema may be given inline in a job file.
    cfg.write_text("json_schema:\n  type: object\n  properties: {a: {type: integer}}\n  required: [a]\n")
    r = run_cli(["--config", cfg, "--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST])
    assert r.exit_code == 0, r.output
    assert all(row["finish_reason"] == "error" or row["output"].lstrip().startswith("{") for row in results(tmp_path / "o"))


@pytest.mark.parametrize("args, message", [
    (["--max-num-seqs", "0"], "max_num_seqs"), (["--block-size", "17"], "block_size must be a power of two"),
    (["--kv-cache-memory-gb", "-1"], "kv_cache_memory_gb"), (["--sjf-max-skipped-steps", "-1"], "sjf_max_skipped_steps"),
    (["--regex", "[a-"], "--regex"), (["--max-model-len", "100000"], "exceeds the model's limit of"),
])
def test_bad_engine_values_and_options_the_tokenizer_refuses_exit_2_before_out_exists(tmp_path, llama_dir, args,
                                                                                       message):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(2))
    r = run_cli(["--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST, *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_a_system_prompt_for_a_model_without_chat_template_is_a_usage_error_before_any_work(tmp_path, llama_dir):
    # It used to fail every row, each with a message about 'messages' the row never gave, and exit 0.
    import shutil

    plain = tmp_path / "plain-model"
    shutil.copytree(llama_dir, plain)
    (plain / "chat_template.jinja").unlink()
    src = write_jsonl(tmp_path / "a.jsonl", prompts(2))
    r = run_cli(["--input", src, "--output", tmp_path / "o", "--model", plain, *FAST, "--system-prompt", "Be brief."])
    assert r.exit_code == 2 and "system_prompt (--system-prompt) needs a chat template" in r.output, r.output
    assert not (tmp_path / "o").exists()
    r = run_cli(["--input", src, "--output", tmp_path / "o", "--model", llama_dir, *FAST, "--system-prompt", "Be brief."])
    assert r.exit_code == 0 and all(row["error"] is None for row in results(tmp_path / "o"))


def _small_job(src, out, llama_dir) -> list:
    """A two-token CPU job's options (sampling left at its defaults)."""
    return ["--input", src, "--output", out, "--model", llama_dir, "--device", "cpu", "--kv-cache-memory-gb", "0.05",
            "--max-tokens", "2", "--quiet"]


def test_options_given_at_their_default_value_resume_the_job_that_left_them_out(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(3))
    out = tmp_path / "out"
    base = _small_job(src, out, llama_dir)
    assert run_cli([*base, "--max-rows", "1"]).exit_code == 0
    limit = json.loads((Path(llama_dir) / "config.json").read_text())["max_position_embeddings"]
    r = run_cli([*base, "--max-rows", "2", "--temperature", "1.0", "--top-p", "1", "--n", "1",
                 "--max-model-len", str(limit)])
    assert r.exit_code == 0, r.output  # was: "another job (sampling.temperature was None, now 1.0)"
    r = run_cli([*base, "--temperature", "0.5"])
    assert r.exit_code == 1 and "sampling.temperature was None, now 0.5" in r.output  # a real change still is
    assert len(results(out)) == 2


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


def test_a_damaged_out_is_an_error_line_naming_the_file_not_a_traceback(tmp_path, llama_dir):
    from pagedbatch.cli import cli
    from click.testing import CliRunner

    src = write_jsonl(tmp_path / "a.jsonl", prompts(3))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST]
    assert run_cli(args).exit_code == 0
    manifest = (out / "job.json").read_text()
    for bad, message in (("[]", "the manifest is a JSON array"), ('{"input": "x.jsonl"}', "its 'input' is a JSON string")):
        (out / "job.json").write_text(bad)
        for r in (run_cli(args), CliRunner().invoke(cli, ["report", str(out), "--no-png"])):
            assert r.exit_code == 1 and f"job.json is not a job manifest: {message}, not an object" in r.output, r.output
            assert r.exception is None or isinstance(r.exception, SystemExit)
    (out / "job.json").write_text(manifest)
    part = out / "results" / _parts(out)[0]
    part.write_bytes(b"")
    for r in (run_cli(args), CliRunner().invoke(cli, ["report", str(out), "--no-png"])):
        assert r.exit_code == 1 and f"result part {part} is unreadable" in r.output and "Move it out" in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_dtype_float32_on_the_cpu_resumes_the_job_that_gave_no_dtype(tmp_path, llama_dir):
    # auto is float32 on the CPU: the same job. A manifest written before the dtype was recorded as computed
    # says "auto", which must still match; bfloat16 is another job.
    src = write_jsonl(tmp_path / "a.jsonl", prompts(4))
    out = tmp_path / "out"
    base = _small_job(src, out, llama_dir)
    assert run_cli([*base, "--max-rows", "1"]).exit_code == 0
    manifest = json.loads((out / "job.json").read_text())
    assert manifest["settings"]["dtype"] == "float32"
    r = run_cli([*base, "--max-rows", "2", "--dtype", "float32"])
    assert r.exit_code == 0, r.output  # was: "another job (dtype was 'auto', now 'float32')"
    manifest["settings"]["dtype"] = "auto"
    manifest.pop("auto_dtype")
    (out / "job.json").write_text(json.dumps(manifest))
    r = run_cli([*base, "--max-rows", "3", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    r = run_cli([*base, "--dtype", "bfloat16"])
    assert r.exit_code == 1 and "dtype was 'auto', now 'bfloat16'" in r.output
    assert len(results(out)) == 3
