"""--model / --revision by Hugging Face Hub id in a job, from a Hub cache laid out on disk (no network)."""
from __future__ import annotations

import json
import subprocess

from hub_cache import MAIN, REPO_ID, V2, hub_cache  # noqa: F401  (a fixture)
from job_helpers import FAST, results, run_batch_cmd, run_cli, subprocess_env, write_jsonl


def test_a_job_runs_a_hub_model_and_its_manifest_records_the_id_and_commit(hub_cache, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello there"}, {"prompt": "dog hello 42"}])
    out = tmp_path / "out"
    r = run_cli(["--input", src, "--output", out, "--model", REPO_ID, *FAST])
    assert r.exit_code == 0, r.output
    assert [row["finish_reason"] for row in results(out)] == ["length", "length"]
    manifest = json.loads((out / "job.json").read_text())
    assert (manifest["settings"]["model"], manifest["settings"]["model_revision"]) == (REPO_ID, MAIN)
    assert manifest["options"]["model"] == REPO_ID and manifest["model_snapshot"].endswith(MAIN)
    # Another revision is another model: the same OUT refuses it before any work.
    r = run_cli(["--input", src, "--output", out, "--model", REPO_ID, "--revision", "v2", *FAST])
    assert r.exit_code == 1 and f"model_revision was '{MAIN}', now '{V2}'" in r.output


def test_run_batch_offline_without_the_model_in_the_cache_fails_before_any_work(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    cache = tmp_path / "empty-cache"
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    p = subprocess.run(run_batch_cmd(["--input", src, "--output", tmp_path / "out", "--model", "Qwen/absent-7B"]),
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert (f"Error: --model Qwen/absent-7B: not a local directory, and the Hugging Face Hub model is not in the "
            f"cache ({cache / 'models--Qwen--absent-7B'})") in p.stderr
    assert not (tmp_path / "out").exists()
