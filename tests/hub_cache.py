"""A Hugging Face Hub cache laid out on disk by the tests themselves (no network): the hub tests' fixture."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

REPO_ID = "tiny-org/tiny-llama"
MAIN, V2 = "a" * 40, "b" * 40


def lay_out_hub_cache(cache, repo_id: str, snapshots: dict[str, str], refs: dict[str, str]) -> str:
    """huggingface_hub's cache layout: blobs by content hash, snapshots/<commit>/ of symlinks, refs/<name>."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for commit, src in snapshots.items():
        snap = os.path.join(repo, "snapshots", commit)
        os.makedirs(snap, exist_ok=True)
        for name in os.listdir(src):
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                shutil.copyfile(os.path.join(src, name), blob)
            os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for name, commit in refs.items():
        with open(os.path.join(repo, "refs", name), "w") as f:
            f.write(commit)
    return repo


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    """A cache holding REPO_ID: main (MAIN) and the ref v2 (V2), two snapshots of the tiny llama."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    lay_out_hub_cache(cache, REPO_ID, {MAIN: tiny_model("llama"), V2: tiny_model("llama")},
                      {"main": MAIN, "v2": V2})
    # As HF_HUB_CACHE / HF_HUB_OFFLINE=1 set before the process started (huggingface_hub reads them at import).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
