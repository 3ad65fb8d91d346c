"""Shared test setup: offline Hugging Face, tiny model factory, GPU skips."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread of torch's (and its subprocesses') math per worker: the README runs two workers on two
    # cores, and two threads each would make four on two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU tensors; the flag must be
    # set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    # Lets tests in subfolders `import model_factory` without __init__ files.
    sys.path.insert(0, str(_TESTS_DIR))

import model_factory  # noqa: E402

SHARED_MODELS_DIR = _TESTS_DIR.parents[0].parent / "shared" / "models"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory ``tiny_model(kind, **kw) -> str``: a built tiny model directory,
    cached for the session per (kind, kw)."""
    cache: dict[tuple, str] = {}

    def make(kind: str, **kw) -> str:
        key = (kind, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{kind}")
            cache[key] = model_factory.build_model(kind, out, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def shared_models_dir() -> Path:
    """``../shared/models`` beside the repository (real tokenizers, stories260k)."""
    if not SHARED_MODELS_DIR.is_dir():
        pytest.skip(f"../shared/models not present: {SHARED_MODELS_DIR} does not exist")
    return SHARED_MODELS_DIR


@pytest.fixture(scope="session")
def shared_tokenizer(shared_models_dir):
    """Factory ``shared_tokenizer(name)``: a real tokenizer of ../shared/models, loaded once per session
    (building Qwen2's from vocab.json and merges takes ~20 s, Llama 3's from tokenizer.model ~50 s)."""
    from transformers import AutoTokenizer

    cache: dict = {}

    def load(name: str):
        path = shared_models_dir / name
        if not path.is_dir():
            pytest.skip(f"{path} not present")
        if name == "llama3-tokenizer":
            pytest.importorskip("tiktoken", reason="the Llama 3 tokenizer is built from tokenizer.model with tiktoken")
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(path)
        return cache[name]

    return load
