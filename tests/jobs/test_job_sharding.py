"""Shards write disjoint parts into one OUT; `pagedbatch report OUT` aggregates them from the Parquet."""
from __future__ import annotations

import json
import os

from click.testing import CliRunner
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.cli import cli
from pagedbatch.io import check_exactly_once
from pagedbatch.jobs.report import _percentiles, _union_length


def test_three_shards_cover_every_record_exactly_once_and_report_aggregates(tmp_path, llama_dir):
    n = 20
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out"
    for shard in range(3):
        r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--num-shards", "3",
                     "--shard-index", shard, *FAST])
        assert r.exit_code == 0, r.output
        # Its own rows: the shards before it committed theirs, not this one's.
        assert f"done: {len(range(shard, n, 3))} rows this run (0 errors, 0 committed earlier)" in r.output
        if shard < 2:
            assert json.loads((out / "report.json").read_text())["status"].startswith("partial")
    assert check_exactly_once(str(out / "results"), range(n)) == ([], [])
    rows = results(out)
    assert all(row["shard"] == row["index"] % 3 for row in rows)
    assert sorted(f for f in os.listdir(out) if f.startswith("progress-")) == [
        "progress-00000.jsonl", "progress-00001.jsonl", "progress-00002.jsonl"]

    os.remove(out / "report.json")
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rows"]["total"] == n and report["time"]["runs"] == 3
    assert report["tokens"]["output"] == sum(row["output_tokens"] for row in rows)

    # From the Parquet alone: without the progress logs, rows still add up; engine figures read n/a.
    for f in os.listdir(out):
        if f.startswith("progress-"):
            os.remove(out / f)
    r = CliRunner().invoke(cli, ["report", str(out), "--no-png"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["total"] == n and report["prefix_cache_hit_rate"] == "n/a"

    # Any other folder is refused, untouched (it used to get report files and exit 0).
    other = tmp_path / "data"
    other.mkdir()
    r = CliRunner().invoke(cli, ["report", str(other)])
    assert r.exit_code == 1 and "is not a pagedbatch job's output directory" in r.output
    assert not os.listdir(other)


def test_report_helpers():
    assert _percentiles([1.0, 2.0, 3.0, 4.0])["p50"] == 2.5
    assert _percentiles([])["p99"] is None
    assert _union_length([(0, 2), (1, 3), (10, 11)]) == 4
