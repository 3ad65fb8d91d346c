"""pagedbatch.generate_dataset: a job over a datasets.Dataset, resumable, returning the input rows joined with
their results in input order."""
from __future__ import annotations

import json
import os

import datasets
import pytest
from job_helpers import FAST, results, run_cli

import pagedbatch
from pagedbatch.jobs.runner import JobError

OPTIONS = dict(device="cpu", kv_cache_memory_gb=0.05, max_tokens=8, temperature=0.0, quiet=True)
TEMPLATE = "Tell {{ meta.who }} about {{ topic }}."


def _dataset() -> datasets.Dataset:
    features = datasets.Features({
        "id": datasets.Value("int64"), "topic": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["neg", "pos"]),
        "meta": {"who": datasets.Value("string"), "age": datasets.Value("int32")}})
    return datasets.Dataset.from_dict({
        "id": [10, 11, 12, 13, 14], "topic": ["cats", "dogs", None, "fish", "owls"], "label": [0, 1, 0, 1, 1],
        "meta": [{"who": "Ann", "age": 7}, {"who": "Bo", "age": 8}, {"who": "Cy", "age": 9}, {"who": "Di", "age": 5},
                 {"who": "Ed", "age": 6}]}, features=features)


def test_generate_dataset_resumes_after_a_partial_run_and_returns_input_rows_with_their_results(
        tmp_path, llama_dir):
    out = str(tmp_path / "gen")
    ds = _dataset()
    partial = pagedbatch.generate_dataset(ds, output_dir=out, model=llama_dir, prompt_template=TEMPLATE,
                                          max_rows=2, **OPTIONS)  # stands in for a run that stopped early
    assert partial["index"] == [0, 1]
    first_parts = set(os.listdir(os.path.join(out, "results")))
    got = pagedbatch.generate_dataset(_dataset(), output_dir=out, model=llama_dir, prompt_template=TEMPLATE,
                                      **OPTIONS)
    assert first_parts < set(os.listdir(os.path.join(out, "results")))  # the first run's parts were kept
    assert got.num_rows == 5 and got["index"] == [0, 1, 2, 3, 4]
    assert got["input_id"] == [10, 11, 12, 13, 14] and got["id"] == ["10", "11", "12", "13", "14"]
    assert got["topic"] == ds["topic"] and got["meta"] == ds["meta"]
    assert got.features["label"] == ds.features["label"] and got["label"] == ds["label"]  # ClassLabel kept
    assert got.features["meta"]["age"] == datasets.Value("int32")
    assert got[2]["finish_reason"] == "error" and got[2]["error"] == "template: field 'topic' is null"
    assert all(got[i]["output"] and got[i]["error"] is None for i in (0, 1, 3, 4))
    assert got[:2]["output"] == partial["output"]  # committed rows were not redone
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["status"] == "complete" and report["rows"]["total"] == 5

    # The same job as `run --keep-columns all` over the same input: the same columns and rows.
    cli_out = tmp_path / "cli"
    r = run_cli(["--input", os.path.join(out, "input.parquet"), "--output", cli_out, "--model", llama_dir, *FAST,
                 "--prompt-template", TEMPLATE, "--keep-columns", "all"])
    assert r.exit_code == 0, r.output
    cli_rows = results(cli_out)
    assert list(cli_rows[0]) == got.column_names
    assert [row["output"] for row in cli_rows] == got["output"]

    # Another dataset in the same output_dir is another job, refused with the job's input copy untouched (it
    # was replaced first, so "Nothing was done" was not true), also at the same size.
    kept = open(os.path.join(out, "input.parquet"), "rb").read()
    other_topic = ds.map(lambda row: {"topic": row["topic"].upper() if row["topic"] else None})
    for other in (ds.select([0, 1]), other_topic):
        with pytest.raises(JobError, match="holds the results of a job over another dataset.*Nothing was done"):
            pagedbatch.generate_dataset(other, output_dir=out, model=llama_dir, prompt_template=TEMPLATE, **OPTIONS)
        assert open(os.path.join(out, "input.parquet"), "rb").read() == kept
    again = pagedbatch.generate_dataset(ds, output_dir=out, model=llama_dir, prompt_template=TEMPLATE, **OPTIONS)
    assert again["output"] == got["output"]  # still the same job: nothing redone


def test_generate_dataset_refuses_splits_and_iterable_datasets_naming_what_to_pass(tmp_path):
    ds = _dataset()
    with pytest.raises(TypeError, match=r"one split, not a DatasetDict with splits \['train'\]"):
        pagedbatch.generate_dataset(datasets.DatasetDict({"train": ds}), output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="an IterableDataset cannot be resumed"):
        pagedbatch.generate_dataset(ds.to_iterable_dataset(), output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="sets the job's 'input' itself"):
        pagedbatch.generate_dataset(ds, output_dir=str(tmp_path), input="x.jsonl")
    assert not os.listdir(tmp_path)


def test_generate_dataset_inside_a_slurm_task_returns_every_row_not_the_tasks_shard(tmp_path, llama_dir, monkeypatch,
                                                                                      capsys):
    # A script run by srun or a job array sees SLURM_* in its environment; the job runner shards by them, but a
    # call that returns a Dataset has to answer every row of the dataset it was given.
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    ds = datasets.Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]})
    got = pagedbatch.generate_dataset(ds, output_dir=str(tmp_path / "gen"), model=llama_dir, **OPTIONS)
    assert got["index"] == [0, 1, 2, 3] and all(got["output"])
    assert "Creating parquet" not in capsys.readouterr().err  # quiet: not even datasets' progress bar
    with pytest.raises(TypeError, match="generate_dataset returns every row: it takes no 'num_shards'"):
        pagedbatch.generate_dataset(ds, output_dir=str(tmp_path / "other"), num_shards=2, shard_index=0)


def test_generate_dataset_leaves_the_input_of_a_run_going_in_output_dir_alone_even_with_overwrite(
        tmp_path, llama_dir):
    # A run in progress reads OUT/input.parquet as it goes: replacing it before finding the output lock taken
    # handed that run the other dataset's rows.
    from pagedbatch.jobs.out_lock import OutputLock

    out = str(tmp_path / "gen")
    pagedbatch.generate_dataset(_dataset(), output_dir=out, model=llama_dir, prompt_template=TEMPLATE,
                                max_rows=1, **OPTIONS)
    kept = open(os.path.join(out, "input.parquet"), "rb").read()
    other = datasets.Dataset.from_dict({"prompt": ["x y", "z"]})
    with OutputLock(out, 0):  # stands in for the first call, still running
        for overwrite in (False, True):
            with pytest.raises(JobError, match="is in use.*Nothing was done"):
                pagedbatch.generate_dataset(other, output_dir=out, model=llama_dir, overwrite=overwrite, **OPTIONS)
            assert open(os.path.join(out, "input.parquet"), "rb").read() == kept
    assert pagedbatch.generate_dataset(other, output_dir=out, model=llama_dir, overwrite=True,
                                       **OPTIONS)["index"] == [0, 1]
