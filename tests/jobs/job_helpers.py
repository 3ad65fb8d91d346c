"""Helpers for the batch-job tests: input writers, CLI runners, results readers.

A module of its own, not conftest.py: ``from conftest import ...`` picks up
whichever test folder's conftest was imported first when several folders are
collected in one run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Small and greedy: every job test runs in about a second on two CPU cores.
FAST = ["--device", "cpu", "--kv-cache-memory-gb", "0.05", "--block-size", "16", "--temperature", "0",
        "--max-tokens", "8", "--quiet"]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def prompts(n: int) -> list[dict]:
    words = ["alpha", "batch", "cache", "delta", "engine", "fox", "graph", "hello", "index", "jump"]
    return [{"id": f"r{i}", "prompt": f"{words[i % 10]} {i} {words[(i * 7) % 10]} says"} for i in range(n)]


def run_cli(args: list[str]):
    """Invoke ``run`` in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from pagedbatch.cli import run

    return CliRunner().invoke(run, [str(a) for a in args], catch_exceptions=False)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run_batch_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "run_batch.py"), *[str(a) for a in args]]


def results(out) -> list[dict]:
    from pagedbatch.io import read_results

    return read_results(os.path.join(out, "results")).to_pylist()
