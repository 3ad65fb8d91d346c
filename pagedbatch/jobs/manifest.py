"""OUT/job.json: which input and which settings an output directory belongs to.

Resuming is only safe when the rerun would produce the same rows, so a run
whose input content or output-changing settings differ from the manifest
stops before any work. Performance settings (block size, memory, batch
sizes, commit cadence, max_rows) may change between runs of one job.
The prompt template and system prompt are compared by their text, the
carried columns by their names and decided types.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Optional

from ..hub import ResolvedModel
from ..io.carried import CarriedColumns
from .options import JobOptions
from .out_lock import busy_shard

MANIFEST = "job.json"
RESULTS = "results"
_HEAD_BYTES = 1 << 20
_DIR_HEAD_BYTES = 64 << 10
_MAX_DIR_FILES = 10_000
# What a job writes into OUT; --overwrite removes these and nothing else.
_JOB_ENTRIES_PREFIXES = ("progress-", "report.", "output.jsonl", ".tmp-report.", ".tmp-output.jsonl")


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class ManifestMismatch(Exception):
    """OUT holds another job's results."""


def input_fingerprint(path: str) -> dict[str, Any]:
    """Identity of the input's content: size and a hash of its first MB
    (of each file, for a directory). The path and mtime are kept for the
    message but not compared: a copied or touched file is the same input."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                files.append(os.path.join(root, name))
                if len(files) >= _MAX_DIR_FILES:
                    break
        digest = hashlib.sha256()
        size = 0
        for f in files:
            rel = os.path.relpath(f, path)
            n = os.path.getsize(f)
            size += n
            digest.update(f"{rel}\0{n}\0".encode())
            digest.update(_head(f, _DIR_HEAD_BYTES))
        return {"path": path, "kind": "directory", "files": len(files), "size": size, "sha256_head": digest.hexdigest()}
    st = os.stat(path)
    return {"path": path, "kind": "file", "size": st.st_size, "mtime": st.st_mtime,
            "sha256_head": hashlib.sha256(_head(path, _HEAD_BYTES)).hexdigest()}


def output_settings(opts: JobOptions, input_format: str, model: ResolvedModel, auto: str,
                    tokenizer: Optional[ResolvedModel] = None,
                    carried: CarriedColumns = CarriedColumns()) -> dict[str, Any]:
    """The settings that change result rows (or their schema). A Hub model is
    recorded by id and snapshot commit (so a new upstream commit is another
    job), a local one by its absolute path."""
    settings = {
        "input_format": input_format,
        "fields": {"prompt": opts.prompt_field, "messages": opts.messages_field,
                   "prompt_token_ids": opts.prompt_token_ids_field, "id": opts.id_field},
        "model": model.identity["name"],
        "model_revision": model.identity["revision"],
        "tokenizer": tokenizer.identity["name"] if tokenizer else None,
        "tokenizer_revision": tokenizer.identity["revision"] if tokenizer else None,
        # As computed (``auto``: what --dtype auto means here): `--dtype float32` on a CPU is the job that gave
        # no --dtype there (manifests before this recorded "auto", which ``differences`` matches against it).
        "dtype": opts.dtype if opts.dtype not in (None, "auto") else auto,
        "load_format": opts.load_format or "auto",
        "quantization": opts.quantization,
        "engine_seed": opts.engine_seed or 0,
        "max_model_len": _given_max_model_len(opts, model),
        # Only when set: manifests written before the option existed still match a job without it.
        **({"kv_cache_dtype": opts.kv_cache_dtype} if opts.kv_cache_dtype not in (None, "auto") else {}),
        "sampling": _non_default_sampling(opts.default_sampling()),
        "columns": {"prompt": opts.include_prompt, "token_ids": opts.include_token_ids,
                    "logprobs": opts.include_logprobs, "openai": opts.output_format == "jsonl"},
        "output_format": opts.output_format,
        "num_shards": opts.num_shards,
    }
    # Only when used, so that the manifests of jobs without them stay as they were.
    if opts.template_text is not None:
        settings["prompt_template"] = opts.template_text
    if opts.system_prompt is not None:
        settings["system_prompt"] = opts.system_prompt
    if carried:
        settings["carried_columns"] = carried.describe()
    return settings


def auto_dtype(opts: JobOptions, model: ResolvedModel) -> str:
    """What ``--dtype auto`` means for this job on this machine (the engine's rule, ``model_runner.auto_dtype``)."""
    import torch

    from ..engine.model_runner import auto_dtype as engine_auto_dtype
    from ..engine.models.config import ModelArgs

    device = (opts.device or "auto").split(":")[0]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_dtype = ModelArgs.from_dir(model.path).torch_dtype
    except Exception:  # an unreadable config fails the model's load with its own message
        model_dtype = None
    return str(engine_auto_dtype(model_dtype, device)).replace("torch.", "")


def _non_default_sampling(values: dict[str, Any]) -> dict[str, Any]:
    """The job's sampling defaults without those equal to SamplingParams' own: ``--temperature 1.0`` is the
    job that gives no temperature, and a rerun adding it resumes instead of being "another job"."""
    from ..sampling_params import SamplingParams

    given, default = SamplingParams.from_dict(values), SamplingParams()
    return {k: v for k, v in values.items() if k == "structured_output" or getattr(given, k) != getattr(default, k)}


def _given_max_model_len(opts: JobOptions, model: ResolvedModel) -> Optional[int]:
    """``--max-model-len`` unless it is the model's own limit (None, as when not given)."""
    if opts.max_model_len is None:
        return None
    try:
        from ..engine.models.config import ModelArgs

        args = ModelArgs.from_dir(model.path)
        limit = min(args.max_position_embeddings, args.sliding_window or args.max_position_embeddings)
    except Exception:  # an unreadable config fails the model's load with its own message
        return opts.max_model_len
    return None if opts.max_model_len == limit else opts.max_model_len


def prepare_output_dir(out: str, manifest: dict[str, Any], overwrite: bool) -> str:
    """Make OUT ready for this job: create it and its manifest, or check the
    existing manifest matches (raising ManifestMismatch with what differs).
    ``overwrite`` first removes everything a job writes into OUT. Returns
    "new", "resume" or "overwritten"."""
    state = "new"
    if overwrite and (os.path.exists(os.path.join(out, MANIFEST)) or os.path.isdir(os.path.join(out, RESULTS))):
        clear_job_files(out)
        state = "overwritten"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, MANIFEST)
    existing = read_manifest(out)
    if existing is None:
        results = os.path.join(out, RESULTS)
        if os.path.isdir(results) and any(n.startswith("part-") for n in os.listdir(results)):
            raise ManifestMismatch(
                f"{out} holds results but no {MANIFEST}, so they cannot be matched to this job. "
                "Use another --output, or --overwrite to delete them and start over.")
        _write_json(path, manifest)
        return state
    problems = differences(existing, manifest)
    if problems:
        raise ManifestMismatch(
            f"{out} holds the results of another job ({'; '.join(problems)}). Nothing was done. "
            "Use another --output, or add --overwrite to delete those results and start over.")
    return "resume"


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems = []
    a, b = old.get("input", {}), new.get("input", {})
    if (a.get("size"), a.get("sha256_head")) != (b.get("size"), b.get("sha256_head")):
        problems.append(f"the input differs: it was {a.get('path')} ({a.get('size')} bytes), "
                        f"now {b.get('path')} ({b.get('size')} bytes)")
    sa, sb = _flatten(old.get("settings", {})), _flatten(new.get("settings", {}))
    if sa.get("dtype") == "auto" and new.get("auto_dtype") == sb.get("dtype"):
        sa["dtype"] = sb["dtype"]  # an older manifest's "auto", and this run computes what auto means here
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            problems.append(f"{key} was {sa.get(key)!r}, now {sb.get(key)!r}")
    return problems


def build_manifest(opts: JobOptions, input_format: str, model: ResolvedModel, tokenizer: Optional[ResolvedModel] = None,
                   carried: CarriedColumns = CarriedColumns()) -> dict[str, Any]:
    auto = auto_dtype(opts, model)
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": input_fingerprint(opts.input),
        "settings": output_settings(opts, input_format, model, auto, tokenizer, carried),
        "auto_dtype": auto,  # not compared: lets an older manifest's "auto" match
        "options": opts.to_dict(),
    }
    if model.repo_id is not None:
        manifest["model_snapshot"] = model.path  # where this run found it (not compared)
    return manifest


def read_manifest(out: str) -> Optional[dict[str, Any]]:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ManifestMismatch(f"{path} is not valid JSON ({e}); fix or remove it, or use --overwrite") from None
    shapes = [("the manifest", manifest)]
    if isinstance(manifest, dict):
        shapes += [(f"its {key!r}", manifest[key]) for key in ("input", "settings") if key in manifest]
    for what, value in shapes:
        if not isinstance(value, dict):
            kind = _JSON_KINDS.get(type(value), type(value).__name__)
            raise ManifestMismatch(f"{path} is not a job manifest: {what} is a JSON {kind}, not an object; fix or "
                                   "remove it, or use --overwrite")
    return manifest


def job_model_name(out: str) -> str:
    """The model a job ran (its Hub id, or its directory's absolute path), as OpenAI output files name it."""
    manifest = read_manifest(out) or {}
    return manifest.get("settings", {}).get("model") or "pagedbatch"


def clear_job_files(out: str) -> None:
    """Remove what a job wrote into OUT (manifest, results, progress logs,
    reports), leaving any other file the user keeps there."""
    if not os.path.isdir(out):
        return
    shutil.rmtree(os.path.join(out, RESULTS), ignore_errors=True)
    for name in os.listdir(out):
        if name == MANIFEST or name.startswith(_JOB_ENTRIES_PREFIXES):
            try:
                os.remove(os.path.join(out, name))
            except (FileNotFoundError, IsADirectoryError):
                pass


def forget_unstarted_job(out: str, shard_index: int) -> None:
    """Undo ``prepare_output_dir`` for a run that failed before committing anything: OUT holds no result
    part and no other shard of the job is running there."""
    results = os.path.join(out, RESULTS)
    if os.path.isdir(results) and any(n.startswith("part-") for n in os.listdir(results)):
        return
    if busy_shard(out, shard_index) is None:
        clear_job_files(out)


def _write_json(path: str, value: Any) -> None:
    # Shards of one job may race to create the manifest; each writes a whole
    # file and renames it, and the contents agree on everything compared.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
