"""A full disk during a commit (ENOSPC from the Parquet writer, simulated): one clear error naming OUT,
committed rows intact, no half-written part, a valid progress log, and a rerun that resumes exactly once."""
from __future__ import annotations

import errno
import json
import os
import re
import textwrap

import pyarrow.parquet as pq
import pytest
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.io import check_exactly_once
from pagedbatch.jobs.progress import ProgressLog, read_progress

N = 10
SMALL_COMMITS = ["--commit-every", "2", "--max-in-flight", "2", "--max-num-seqs", "2"]


def _disk_fills_after(commits: int):
    """A pq.write_table that writes ``commits`` parts, then half of one before ENOSPC."""
    real, calls = pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(1)
        if len(calls) > commits:
            where.write(b"PAR1 a part cut short")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where, **kw)

    return write_table


def test_a_full_disk_stops_the_job_with_one_error_naming_out_and_the_rerun_resumes_exactly_once(
        tmp_path, llama_dir, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST, *SMALL_COMMITS]
    monkeypatch.setattr(pq, "write_table", _disk_fills_after(2))
    r = run_cli(args)
    assert r.exit_code == 1
    full = f"the disk holding the output directory {out} is full (No space left on device)"
    assert r.output.count(full) == 1 and "Traceback" not in r.output, r.output
    assert "Free some space on that disk, then rerun the same command to resume" in r.output
    assert "4 rows are committed in all" in r.output
    names = os.listdir(out / "results")
    assert len(names) == 2 and all(n.startswith("part-") for n in names)  # no .tmp- left behind
    committed = {row["index"] for row in results(out)}
    assert len(committed) == 4
    monkeypatch.undo()  # space freed
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
    runs = [e for e in read_progress(str(out)) if e["event"] in ("start", "end")]
    assert [(e["event"], e.get("status")) for e in runs] == [("start", None), ("end", "failed"), ("start", None),
                                                             ("end", "complete")]
    assert json.loads((out / "report.json").read_text())["rows"]["total"] == N


def test_a_progress_line_cut_off_by_a_full_disk_does_not_swallow_the_next_event(tmp_path):
    ProgressLog(str(tmp_path), 0, "run1").write("start")
    with open(tmp_path / "progress-00000.jsonl", "a") as f:
        f.write('{"event": "commit", "t": 1')  # what a full disk left of a line
    ProgressLog(str(tmp_path), 0, "run2").write("start")
    assert [(e["event"], e["run_id"]) for e in read_progress(str(tmp_path))] == [("start", "run1"), ("start", "run2")]


_SITECUSTOMIZE = """
    import errno, os
    if os.environ.get("PAGEDBATCH_TEST_ENOSPC_AFTER"):
        import pyarrow.parquet as pq
        _real, _calls, _after = pq.write_table, [], int(os.environ["PAGEDBATCH_TEST_ENOSPC_AFTER"])
        def _write_table(table, where, **kw):
            _calls.append(1)
            if len(_calls) > _after:
                where.write(b"PAR1 cut short")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real(table, where, **kw)
        pq.write_table = _write_table
"""


@pytest.mark.slow
def test_a_data_parallel_worker_on_a_full_disk_fails_the_job_with_the_same_message(tmp_path, llama_dir, monkeypatch):
    # Workers are processes: the fault is planted at their start through a sitecustomize module.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PAGEDBATCH_TEST_ENOSPC_AFTER", "1")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--model", llama_dir, *FAST, *SMALL_COMMITS]
    r = run_cli([*args, "--data-parallel-size", "2"])
    assert r.exit_code == 1
    full = f"the disk holding the output directory {out} is full (No space left on device)"
    assert re.search(r"failed: worker \d \(pid \d+, [^\n]*\) failed: " + re.escape(full), r.output), r.output
    assert "Traceback" not in r.output
    assert not [n for n in os.listdir(out / "results") if n.startswith(".tmp-")]
    monkeypatch.delenv("PAGEDBATCH_TEST_ENOSPC_AFTER")
    r = run_cli(args)  # space freed; a resume may change --data-parallel-size
    assert r.exit_code == 0, r.output
    assert check_exactly_once(str(out / "results"), range(N)) == ([], [])
