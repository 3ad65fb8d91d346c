"""--kv-cache-dtype: the job runs on an fp8 cache, records it, and a resume with another cache is refused."""
from __future__ import annotations

import json

from job_helpers import FAST, prompts, results, run_cli, write_jsonl


def test_fp8_kv_cache_job_runs_is_recorded_and_pins_resume(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "a.jsonl", prompts(4))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST]
    r = run_cli([*args, "--kv-cache-dtype", "fp8"])
    assert r.exit_code == 0, r.output
    rows = results(out)
    assert len(rows) == 4 and all(row["error"] is None and row["output_tokens"] == 8 for row in rows)
    manifest = json.loads((out / "job.json").read_text())
    assert manifest["settings"]["kv_cache_dtype"] == "fp8" and manifest["options"]["kv_cache_dtype"] == "fp8"
    r = run_cli(args)  # the default cache would give other rows: not a resume of this job
    assert r.exit_code == 1 and "kv_cache_dtype was 'fp8'" in r.output
    r = run_cli([*args, "--kv-cache-dtype", "fp16"])
    assert r.exit_code == 2 and "fp8_e4m3" in r.output


def test_server_passes_kv_cache_dtype_to_the_engine_config():
    from click.testing import CliRunner

    from pagedbatch.server.cli import serve

    # Validated by EngineConfig before any model is loaded: the option reached it.
    r = CliRunner().invoke(serve, ["--kv-cache-dtype", "fp8", "--attention-backend", "triton-basic"])
    assert r.exit_code == 2 and "'triton-basic' has no fp8 KV cache" in r.output
