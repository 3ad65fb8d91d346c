"""Models by Hugging Face Hub id, from a Hub cache the tests lay out on disk (no network, HF_HUB_OFFLINE=1):
resolution, revisions, the offline error, and the Python API and the server taking an id (the job runner:
tests/jobs/test_job_hub_models.py)."""
from __future__ import annotations

import os
import shutil

import pytest
from hub_cache import MAIN, REPO_ID, V2, hub_cache  # noqa: F401  (a fixture)

from pagedbatch.hub import ModelNotFound, resolve_model


def test_a_hub_id_resolves_to_its_cached_snapshot_and_a_revision_to_another(hub_cache):
    main = resolve_model(REPO_ID)
    assert main.path == os.path.join(hub_cache, "models--tiny-org--tiny-llama", "snapshots", MAIN)
    assert (main.repo_id, main.commit, main.identity) == (REPO_ID, MAIN, {"name": REPO_ID, "revision": MAIN})
    assert os.path.isfile(os.path.join(main.path, "config.json"))
    assert resolve_model(REPO_ID, "v2").commit == V2  # a ref
    assert resolve_model(REPO_ID, V2).commit == V2  # a commit hash


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(hub_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model("llama"), tmp_path / REPO_ID)
    local = resolve_model(REPO_ID)
    assert local.path == REPO_ID and local.repo_id is None
    assert local.identity == {"name": str(tmp_path / REPO_ID), "revision": None}
    with pytest.raises(ValueError, match="is a local directory; a revision"):
        resolve_model(REPO_ID, "v2")


def test_offline_and_not_cached_is_one_error_naming_the_id_and_the_cache_path(hub_cache):
    with pytest.raises(ModelNotFound) as e:
        resolve_model("tiny-org/absent")
    message = str(e.value)
    assert message.startswith("--model tiny-org/absent: not a local directory, and the Hugging Face Hub model is not "
                              f"in the cache ({os.path.join(hub_cache, 'models--tiny-org--absent')}) and "
                              "HF_HUB_OFFLINE=1 forbids downloading it")
    with pytest.raises(ModelNotFound, match="at revision 'v3' is not in the cache"):
        resolve_model(REPO_ID, "v3")
    with pytest.raises(ModelNotFound, match="model directory not found: /no/such/dir"):
        resolve_model("/no/such/dir")


def test_the_python_api_and_the_server_take_a_hub_id(hub_cache, monkeypatch):
    from click.testing import CliRunner

    from pagedbatch import InferenceEngine
    from pagedbatch.server.cli import serve

    engine = InferenceEngine(REPO_ID, revision="v2", device="cpu", kv_cache_memory_gb=0.05)
    assert engine.config.model.endswith(V2)
    assert engine.generate("hello", max_tokens=3, temperature=0)[0].output_tokens == 3
    with pytest.raises(FileNotFoundError, match="model_path tiny-org/absent: not a local directory"):
        InferenceEngine("tiny-org/absent")

    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    r = CliRunner().invoke(serve, ["--model", REPO_ID, "--device", "cpu", "--kv-cache-memory-gb", "0.05"])
    assert r.exit_code == 0, r.output
    assert served and f"serving '{REPO_ID}'" in r.output
    r = CliRunner().invoke(serve, ["--model", "tiny-org/absent"])
    assert r.exit_code == 1 and "tiny-org/absent: not a local directory" in r.output
