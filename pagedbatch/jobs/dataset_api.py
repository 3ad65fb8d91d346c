"""``pagedbatch.generate_dataset``: a batch job over a ``datasets.Dataset``, from Python.

A thin layer over the job runner: the dataset is written once as
``OUT/input.parquet`` (the job's input, so the run is resumable like any
job: calling again with the same dataset and ``output_dir`` continues where
a crash stopped), the job runs with ``JobOptions`` built from the keyword
arguments (the job options' names, ``docs/jobs.md``), and the committed
results come back as a ``datasets.Dataset`` in input order (with ``n``
samples per record, its n rows in ``sample_index`` order). With the
default ``keep_columns="all"`` every input column is carried into the
results (input columns named like result columns become ``input_<name>``),
so the returned rows are the input rows joined with their generations.
"""
from __future__ import annotations

import filecmp
import os
from typing import Any, Optional, Sequence, Union

from ..io import RESERVED_COLUMNS, read_results
from .manifest import MANIFEST, RESULTS
from .options import JobOptions
from .runner import JobError, run_job, take_output_lock

INPUT_FILE = "input.parquet"


def generate_dataset(dataset, *, output_dir: str, model: Optional[str] = None, prompt_template: Optional[str] = None,
                     system_prompt: Optional[str] = None, keep_columns: Union[str, Sequence[str], None] = "all",
                     **options: Any):
    """Run a batch job over ``dataset`` and return its results as a ``datasets.Dataset``.

    ``dataset``: a ``datasets.Dataset`` whose rows are records as in a job's
    input (a ``prompt``, ``messages`` or ``prompt_token_ids`` column, or any
    columns with ``prompt_template``; optional ``id`` and per-row sampling
    columns). ``output_dir``: the job's OUT (results, report, manifest and
    the input copy). ``model``: a model directory or Hub id (None: the demo
    model). ``options``: any other job option (``max_tokens=256``,
    ``temperature=0.7``, ``data_parallel_size="auto"``, ``overwrite=True``,
    ...; not ``num_shards``/``shard_index``: it runs every row, also inside a Slurm task).

    Returns one row per input record, in input order, with the result
    columns (``sample_index``, ``output``, ``finish_reason``, ``error``, token
    counts, timings) and the carried input columns; with ``n=k`` (or a per-row
    ``n``) one row per sample, ordered by (index, sample_index), the input
    columns repeated on each. A record that failed is a row with
    ``finish_reason="error"`` and its ``error`` (docs/jobs.md: how many). Raises ValueError for a bad
    option, JobError when the job cannot start, or when it does not complete
    (interrupted, aborted by ``max_error_rate``, a failed worker): the
    message says why; committed rows are kept and the same call resumes.
    """
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"generate_dataset takes one split, not a {type(dataset).__name__} with splits "
                        f"{list(dataset)}; pass e.g. dataset[{next(iter(dataset), 'train')!r}]")
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError("generate_dataset takes a datasets.Dataset; an IterableDataset cannot be resumed "
                        "(materialise it with datasets.Dataset.from_generator, or write it to Parquet and "
                        "run `pagedbatch run --input ...`)")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"generate_dataset takes a datasets.Dataset, got {type(dataset).__name__}")
    for name in ("input", "output"):
        if name in options:
            raise TypeError(f"generate_dataset sets the job's {name!r} itself; give output_dir")
    for name in ("num_shards", "shard_index"):
        if name in options:
            raise TypeError(f"generate_dataset returns every row: it takes no {name!r}; to shard a job, run "
                            "`pagedbatch run --num-shards N --shard-index I` over the dataset written to Parquet")
    # One shard, given: left as None, JobOptions would shard by SLURM_* and, in a Slurm task,
    # the Dataset returned would silently hold only that task's share of the rows.
    opts = JobOptions(input=os.path.join(output_dir, INPUT_FILE), output=output_dir, model=model,
                      prompt_template=prompt_template, system_prompt=system_prompt,
                      keep_columns=list(keep_columns) if isinstance(keep_columns, (list, tuple)) else keep_columns,
                      num_shards=1, shard_index=0, **options)
    # The input is written under the output lock: a run already going in output_dir reads input.parquet
    # as it goes, and replacing it would hand that run this dataset's rows.
    lock = take_output_lock(output_dir, 0, opts.overwrite)
    try:
        write_input(dataset, opts.input,
                    replace=opts.overwrite or not os.path.exists(os.path.join(output_dir, MANIFEST)), quiet=opts.quiet)
        result = run_job(opts, resume_command="call generate_dataset again with the same arguments", lock=lock)
    finally:
        lock.release()
    if result.status != "complete":
        raise JobError(result.message)
    return _as_dataset(read_results(os.path.join(output_dir, RESULTS)), dataset.features)


def write_input(dataset, path: str, replace: bool = True, quiet: bool = False) -> None:
    """Write ``dataset`` as the job's Parquet input, keeping an identical existing
    copy untouched (same bytes: a rerun is a resume). A different existing copy is
    replaced when ``replace`` (a new job, or ``overwrite``); otherwise it is the input
    of the job whose results OUT holds, and a JobError says so with OUT unchanged.
    ``quiet``: without datasets' progress bar."""
    import datasets
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}.{os.getpid()}")
    try:
        shown = datasets.is_progress_bar_enabled()
        if quiet and shown:
            datasets.disable_progress_bars()
        try:
            dataset.to_parquet(tmp)
        finally:
            if quiet and shown:
                datasets.enable_progress_bars()
        if os.path.isfile(path) and filecmp.cmp(tmp, path, shallow=False):
            os.remove(tmp)
        elif os.path.isfile(path) and not replace:
            os.remove(tmp)
            out = os.path.dirname(os.path.abspath(path))
            raise JobError(f"{out} holds the results of a job over another dataset ({os.path.basename(path)}, the "
                           "dataset it ran on, has other contents than this one). Nothing was done. Use another "
                           "output_dir, or overwrite=True to delete those results and start over")
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _as_dataset(table, input_features):
    import datasets

    # Carried columns under their own names get the input's feature types back
    # (a ClassLabel stays a ClassLabel); the rest follow their Arrow types.
    features = datasets.Features.from_arrow_schema(table.schema)
    for name in features:
        if name in input_features and name not in RESERVED_COLUMNS:
            features[name] = input_features[name]
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))


__all__ = ["generate_dataset", "write_input", "INPUT_FILE"]
