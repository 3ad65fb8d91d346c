"""pagedbatch inside your own Ray Data pipelines: ``Generate``, one engine replica per actor.

    import ray
    import pagedbatch.ray

    ds = ray.data.read_parquet("/data/prompts/")   # a "prompt", "messages" or "prompt_token_ids" column
    ds = ds.map_batches(
        pagedbatch.ray.Generate,
        fn_constructor_kwargs={"model": "/models/Qwen2.5-7B-Instruct", "max_tokens": 256, "temperature": 0.7},
        batch_size=512, batch_format="pyarrow", concurrency=4, num_gpus=1)
    ds.write_parquet("/data/generations/")

Rows go in and come out in the same order with every input column kept
and the output columns added (replaced if present): ``sample_index``, ``output``,
``finish_reason``, ``error``, ``prompt_tokens``, ``output_tokens``,
``queue_s``, ``ttft_s``, ``latency_s``, ``tpot_s``, ``num_preemptions``,
and with ``include_token_ids`` / ``include_logprobs``,
``prompt_token_ids``, ``output_token_ids`` / ``logprobs``. A bad row
(no prompt, a wrong type, an invalid sampling value, a prompt too long)
gets ``finish_reason="error"`` and an ``error`` naming the field; the
others complete. Rows may carry their own sampling fields (``max_tokens``,
``temperature``, ``n``, ...), as in a job's input. With ``n`` > 1 (the
option, or a row's ``n``) a row comes out n times, once per sample, its
input columns repeated and ``sample_index`` 0..n-1.

The constructor takes the job runner's options about the model, the engine,
sampling defaults and columns, with the same names (``docs/jobs.md``):
``model`` (a Hugging Face model directory or Hub id; None: the demo model),
``dtype``, ``max_num_seqs``, ``max_tokens``, ``temperature``, ...,
``prompt_field``, ``messages_field``, ``prompt_token_ids_field``,
``include_token_ids``, ``include_logprobs``, ``order``, ``max_in_flight``,
``prompt_template``, ``system_prompt``, ``revision``.
Each actor loads the model once and runs each batch to completion through
its engine (continuous batching within the batch), so a ``batch_size`` of a
few times ``max_num_seqs`` keeps the engine full. Ray gives each actor its
GPUs (``num_gpus``) through CUDA_VISIBLE_DEVICES.

``run_batch.py --executor ray`` runs a whole job this way (docs/parallel.md).

This module is named ``ray`` inside the package and imports the real Ray
by absolute import; Ray is an optional dependency (``pip install
"pagedbatch[ray]"``), needed by the pipelines that call this class, not by
the class itself.
"""
from __future__ import annotations

if __name__ == "ray":  # pragma: no cover - a script run from inside pagedbatch/ puts this folder on sys.path
    raise ImportError("pagedbatch/ray.py was imported as the top-level module 'ray' because the pagedbatch/ "
                      "folder is on sys.path (a script started from inside it?). Run from the repository "
                      "root instead: python run_batch.py ..., or the installed `pagedbatch` command.")

import time
from typing import Any, Optional

from .io import InputRecord, result_schema
from .io.carried import CarriedColumns
from .jobs.options import ENGINE_FIELDS, SAMPLING_FIELDS, JobOptions
from .jobs.ordering import admission_order
from .jobs.prepare import Prepared, RowPreparer
from .jobs.replica import Replica, drive

INSTALL_HINT = 'Ray is not installed: pip install "pagedbatch[ray]" (or: pip install "ray[data]>=2.40")'

# The job options Generate takes; the rest (input, output, resume, ...) belong to a job.
GENERATE_OPTIONS = frozenset(ENGINE_FIELDS) | frozenset(SAMPLING_FIELDS) | {
    "prompt_field", "messages_field", "prompt_token_ids_field", "include_token_ids", "include_logprobs",
    "order", "max_in_flight", "prompt_template", "system_prompt", "revision", "tokenizer_revision"}
_BASE_OUTPUT_COLUMNS = ("sample_index", "output", "finish_reason", "error", "prompt_tokens", "output_tokens",
                        "queue_s", "ttft_s", "latency_s", "tpot_s", "num_preemptions")


def require_ray():
    """The ``ray`` module, or ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return ray


class _Rows:
    """A PartWriter stand-in that keeps a batch's result rows in memory: the
    caller of the actor decides what is committed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def pending(self) -> int:
        return 0  # never commits

    def commit(self) -> None:
        return None


class EngineActor:
    """One engine replica: records in, result rows (one per record) out.
    ``engine_config`` has its model and tokenizer resolved to local directories."""

    def __init__(self, opts: JobOptions, engine_config, input_format: str, carried: CarriedColumns = CarriedColumns()):
        from .engine.llm_engine import LLMEngine

        self.opts = opts
        self.input_format = input_format
        self.engine = LLMEngine(engine_config)
        self.preparer = RowPreparer(opts, input_format, self.engine.tokenizer, self.engine.validate_prompt,
                                    carried=carried, check_structured=self.engine.check_structured_output)
        self.ready_t = time.time()

    def results(self, records: list[InputRecord]) -> list[dict]:
        """Run the records through the engine; their result rows (one per sample) in the records' order."""
        rows = _Rows()
        rep = Replica(self.opts, self.engine, rows, on_commit=lambda *_: None)
        prepared = (self.preparer.prepare(r) for r in records)
        todo = admission_order(prepared, self.opts.order, max(len(records), 1), key_ids=lambda p: p.token_ids,
                               hold=lambda it: isinstance(it, Prepared))
        drive(rep, todo, self.opts.effective_max_in_flight)
        position = {r.index: i for i, r in enumerate(records)}
        return sorted(rows.rows, key=lambda row: position[row["index"]])


class Generate(EngineActor):
    """A Ray Data callable class: ``ds.map_batches(Generate, fn_constructor_kwargs={...}, ...)``.
    See the module docstring."""

    def __init__(self, model: Optional[str] = None, **options: Any):
        unknown = sorted(set(options) - GENERATE_OPTIONS)
        if unknown:
            raise ValueError(f"Generate: unknown option(s) {', '.join(unknown)}; it takes model and "
                             f"{', '.join(sorted(GENERATE_OPTIONS))}")
        opts = JobOptions(input="<ray dataset>", model=model, quiet=True, **options)
        if model is None:
            from .demo import demo_model_dir

            model_dir, tokenizer_dir = demo_model_dir(), None
        else:  # a Hub id is resolved on each actor's node (its own cache)
            from .hub import resolve_model

            model_dir = resolve_model(model, opts.revision).path
            tokenizer_dir = None if opts.tokenizer is None else \
                resolve_model(opts.tokenizer, opts.tokenizer_revision, what="tokenizer").path
        super().__init__(opts, opts.engine_config(model_dir, tokenizer_dir), "jsonl")
        self.columns = list(_BASE_OUTPUT_COLUMNS)
        if opts.include_token_ids:
            self.columns += ["prompt_token_ids", "output_token_ids"]
        if opts.include_logprobs:
            self.columns.append("logprobs")
        self.schema = result_schema(include_token_ids=opts.include_token_ids, include_logprobs=opts.include_logprobs)

    def __call__(self, batch):
        rows = _rows_of(batch)
        results = self.results([InputRecord(i, row, None) for i, row in enumerate(rows)])
        positions = [r["index"] for r in results]
        if len(positions) != len(rows):  # n samples: a row's input columns repeat on each of its n rows
            batch = _take(batch, positions)
        columns = {name: [r.get(name) for r in results] for name in self.columns}
        return _with_columns(batch, columns, self.schema)


# --- batch formats: Ray passes pyarrow Tables, pandas DataFrames or dicts of numpy arrays ---


def _rows_of(batch) -> list[dict]:
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return [{k: _plain(v) for k, v in row.items()} for row in batch.to_dict("records")]
    if isinstance(batch, dict):
        n = len(next(iter(batch.values()))) if batch else 0
        return [{k: _plain(v[i]) for k, v in batch.items()} for i in range(n)]
    raise TypeError(f"Generate takes batches as pyarrow Tables, pandas DataFrames or dicts of arrays, "
                    f"got {type(batch).__name__}")


def _plain(value: Any) -> Any:
    # numpy scalars and arrays (pandas and "numpy" batches) become the Python values rows are checked as.
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _take(batch, positions: list[int]):
    import numpy as np
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch.take(pa.array(positions, pa.int64()))
    if isinstance(batch, dict):
        where = np.asarray(positions, dtype=np.int64)
        return {k: np.asarray(v)[where] for k, v in batch.items()}
    return batch.iloc[positions].reset_index(drop=True)  # pandas


def _with_columns(batch, columns: dict[str, list], schema):
    import numpy as np
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        for name, values in columns.items():
            array = pa.array(values, type=schema.field(name).type)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, array)
            else:
                batch = batch.append_column(name, array)
        return batch
    if isinstance(batch, dict):
        out = dict(batch)
        for name, values in columns.items():
            array = np.empty(len(values), dtype=object)  # lists stay lists, None stays None
            for i, value in enumerate(values):
                array[i] = value
            out[name] = array
        return out
    batch = batch.copy()  # pandas
    for name, values in columns.items():
        batch[name] = values
    return batch


__all__ = ["Generate", "EngineActor", "GENERATE_OPTIONS", "require_ray", "INSTALL_HINT"]
