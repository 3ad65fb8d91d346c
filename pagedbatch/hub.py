"""Models by Hugging Face Hub id: ``resolve_model("Qwen/Qwen2.5-7B-Instruct") -> a local directory``.

A local directory always wins; anything else is taken as a Hub id and
resolved through ``huggingface_hub.snapshot_download``, which uses its own
cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``) and honours
``HF_HUB_OFFLINE=1``. Only what the engine reads is fetched: configs,
tokenizer files, chat templates and safetensors weights (never pickle
``.bin`` files, never other formats). The job runner, the Python API and the
server resolve their ``model`` / ``tokenizer`` here, once, before any work;
``EngineConfig`` itself always holds local directories.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

# What the engine and the tokenizer read from a model repository.
MODEL_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template.*", "*.jinja",
]
# A tokenizer alone; config.json tells AutoTokenizer which class to build.
TOKENIZER_FILES = [p for p in MODEL_FILES if "safetensors" not in p and p != "generation_config.json"]

# "name" or "org/name": letters, digits, '-', '_', '.' (the Hub's rule, without its finer points).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelNotFound(FileNotFoundError):
    """Neither a local directory nor a Hub id that could be resolved."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model (or tokenizer) is on disk, and where it came from."""

    path: str  # a local directory
    repo_id: Optional[str] = None  # None: given as a local directory
    revision: Optional[str] = None  # as asked (None: the default branch)
    commit: Optional[str] = None  # the snapshot's commit hash, when known

    @property
    def identity(self) -> dict:
        """What a job's manifest records: the id and commit for a Hub model, else the absolute path."""
        if self.repo_id is None:
            return {"name": os.path.abspath(self.path), "revision": None}
        return {"name": self.repo_id, "revision": self.commit or self.revision}


def resolve_model(name_or_path: str, revision: Optional[str] = None, *, what: str = "model",
                  option: Optional[str] = None, cache_dir: Optional[str] = None) -> ResolvedModel:
    """A local directory for ``name_or_path``: the directory itself if it is
    one, else the Hub id's snapshot (downloaded unless cached or offline).

    ``what`` ("model" or "tokenizer") chooses the files fetched; ``option``
    names the setting in messages (default ``--model`` / ``--tokenizer``);
    ``cache_dir`` overrides huggingface_hub's cache.
    Raises ModelNotFound (a FileNotFoundError) with the id and the cache path
    when the model cannot be had, ValueError for a revision of a local directory."""
    option = option or f"--{what}"
    if os.path.isdir(name_or_path):
        if revision is not None:
            raise ValueError(f"{option} {name_or_path} is a local directory; a revision ({revision!r}) "
                             "applies only to Hugging Face Hub ids")
        return ResolvedModel(name_or_path)
    if os.path.exists(name_or_path):
        raise ModelNotFound(f"{option} {name_or_path} is a file; give a Hugging Face model directory or Hub id")
    if not _REPO_ID.match(name_or_path) or name_or_path.startswith((".", "~")):
        raise ModelNotFound(f"{what} directory not found: {name_or_path} (give {option} a local Hugging Face "
                            "model directory or a Hub id such as Qwen/Qwen2.5-7B-Instruct)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ModelNotFound(f"{name_or_path} is not a local directory, and huggingface_hub (for Hub ids) "
                            f"cannot be imported: {e}") from None
    cache = cache_dir or constants.HF_HUB_CACHE
    repo_cache = os.path.join(cache, "models--" + name_or_path.replace("/", "--"))
    try:
        path = snapshot_download(name_or_path, revision=revision, cache_dir=cache,
                                 allow_patterns=MODEL_FILES if what == "model" else TOKENIZER_FILES)
    except Exception as e:  # offline, no network, unknown repo or revision: one message for all
        at = f" at revision {revision!r}" if revision else ""
        offline = " and HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else ""
        raise ModelNotFound(
            f"{option} {name_or_path}: not a local directory, and the Hugging Face Hub model{at} is not in the "
            f"cache ({repo_cache}){offline}. Download it where there is network (huggingface-cli download "
            f"{name_or_path}), point HF_HUB_CACHE or HF_HOME at a cache that has it, or give a local directory. "
            f"({type(e).__name__}: {_first_line(e)})") from None
    commit = os.path.basename(os.path.normpath(path))
    return ResolvedModel(path, name_or_path, revision, commit if _COMMIT.match(commit) else None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


__all__ = ["resolve_model", "ResolvedModel", "ModelNotFound", "MODEL_FILES", "TOKENIZER_FILES"]
