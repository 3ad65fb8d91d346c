"""``--quantization fp8`` in batch jobs: on the command line and in YAML job files, recorded in the manifest and the
report, refused on resume when it changed."""
from __future__ import annotations

import json

import pytest
from job_helpers import FAST, prompts, results, run_cli, write_jsonl

from pagedbatch.jobs.options import JobOptions


def test_quantization_option_runs_the_job_in_fp8_and_is_part_of_the_job_identity(tmp_path, llama_dir):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    args = ["--input", src, "--model", llama_dir, "--output", tmp_path / "out", *FAST]
    r = run_cli([*args, "--quantization", "fp8"])
    assert r.exit_code == 0, r.output
    assert len(results(tmp_path / "out")) == 4
    manifest = json.loads((tmp_path / "out" / "job.json").read_text())
    assert manifest["settings"]["quantization"] == "fp8"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["engine_config"]["quantization"] == report["quantization"] == "fp8"
    assert "(float32, fp8 weights)" in (tmp_path / "out" / "report.md").read_text()
    # Other weights give other rows: the same OUT without fp8 is another job.
    r = run_cli(args)
    assert r.exit_code != 0 and "quantization was 'fp8', now None" in r.output
    r = run_cli([*args, "--quantization", "int4"])
    assert r.exit_code == 2 and "Invalid value for '--quantization'" in r.output


def test_yaml_job_file_sets_quantization(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: in.jsonl\nquantization: fp8\n")
    opts = JobOptions.from_sources({}, str(cfg))
    assert opts.engine_config("some/model").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization must be None"):
        JobOptions(input="x.jsonl", quantization="int8").engine_config("m")

