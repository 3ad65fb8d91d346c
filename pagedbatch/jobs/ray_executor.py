"""``--executor ray``: the same job on a Ray cluster, through Ray Data.

Pipeline: ``read_datasource(JobInput)`` -> ``map_batches(JobActor,
concurrency=N, num_gpus=tp)`` -> this process (the driver), which commits
the result rows as parts into OUT with the job's ``PartWriter`` and writes
the progress log and the report, as the local job does.

* Reading: ``JobInput`` is a Ray Data ``FileBasedDatasource``: Ray lists
  the files and reads each one in a Ray task; the rows are parsed by the
  job's own per-file readers (``pagedbatch.io.file_records``), so every
  record keeps the index the local job gives it (its position in the
  input: Ray's readers number nothing), and malformed lines or CSV rows
  become error records at their position instead of failing the read.
  The read task also drops committed indices, other shards' rows and rows
  past ``--max-rows``, so a resumed job reads only what is left.
* One engine actor per GPU (or tensor-parallel group): ``JobActor`` parses,
  validates and tokenizes its batch, runs it through its engine and returns
  the job's result rows (bad records as error rows).
* Exactly once, whatever Ray retries: actors never write to OUT. Ray
  restarts a dead actor and reruns its batch, and a retried read replays
  its file from the start, so a row can reach the driver twice; the driver
  keeps the first and drops any index it has already taken this run, and
  it alone commits, atomically, exactly as the local job. A record of n
  samples is taken whole: each row says how many rows its record has, the
  driver gathers them (Ray may split an actor's output into several blocks)
  and hands the writer a record only once all its rows are in, so a part
  never holds part of a record and a repeat is dropped whole. A driver that
  dies loses only its uncommitted rows, which the rerun redoes; Ray tears
  down a dead driver's actors, and they could not write anyway. OUT need
  only be reachable from the driver; the input must be readable from every
  node (a shared filesystem).

Inputs: JSON Lines (and OpenAI batch files), Parquet (a file or a folder)
and CSV. SIGTERM/SIGINT stop at the next batch the driver receives.
"""
from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from typing import Any, Iterator, Optional, TextIO

from ..io import PartWriter, file_records, is_disk_full, parquet_files
from ..io.carried import CarriedColumns
from ..ray import EngineActor, require_ray
from .manifest import RESULTS
from .options import JobOptions
from .progress import Counters, ProgressDisplay, ProgressLog
from .replica import commit_due, error_rate_exceeded, job_result_schema, note_first_error
from .signals import StopRequest

RAY_FORMATS = ("jsonl", "openai", "parquet", "csv")
# A deterministic failure (a bad GPU, a batch that always runs out of memory) must end
# the job, not be retried for ever (Ray Data's default for actor pools).
_ACTOR_RETRIES = 3
# Columns actors add for the driver, never committed: the actor, its statistics (last row), and
# how many rows the row's record has (one per sample).
_WORKER, _META, _RECORD_ROWS = "_worker", "_meta", "_record_rows"


def input_files(path: str, fmt: str) -> dict[str, int]:
    """Each input file's absolute path -> the index of its first record."""
    if fmt != "parquet":
        return {os.path.abspath(path): 0}
    import pyarrow.parquet as pq

    offsets, start = {}, 0
    for f in parquet_files(path):
        offsets[os.path.abspath(f)] = start
        start += pq.read_metadata(f).num_rows
    return offsets


def _datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class JobInput(FileBasedDatasource):
        """This shard's uncommitted records, with their indices, as blocks of
        (index, record: the pickled row, error)."""

        def __init__(self, offsets: dict[str, int], fmt: str, opts: JobOptions, done: list[int]):
            super().__init__(list(offsets))
            import numpy as np

            self.offsets, self.fmt = offsets, fmt
            self.num_shards, self.shard_index, self.max_rows = opts.num_shards, opts.shard_index, opts.max_rows
            # Ray hands an actor whole blocks: a block of at most one actor batch lets every actor get work.
            self.batch_rows = min(opts.read_batch_rows, opts.effective_max_in_flight)
            self.done = np.array(sorted(done), dtype=np.int64)  # compact in every read task

        def _read_stream(self, f, path: str) -> Iterator:
            import pyarrow as pa
            import pyarrow.fs as pafs

            f.close()  # the job's readers open the file themselves (Parquet needs random access)
            offset = self.offsets[os.path.abspath(path)]
            if self.max_rows is not None and offset >= self.max_rows:
                return
            done = set(self.done.tolist())
            local = pafs.LocalFileSystem()
            schema = pa.schema([("index", pa.int64()), ("record", pa.binary()), ("error", pa.string())])
            rows: list[dict] = []
            for rec in file_records(path, self.fmt, lambda: local.open_input_file(path), batch_rows=self.batch_rows):
                index = offset + rec.index
                if self.max_rows is not None and index >= self.max_rows:
                    break
                if index % self.num_shards != self.shard_index or index in done:
                    continue
                rows.append({"index": index, "error": rec.error,
                             "record": None if rec.data is None else pickle.dumps(rec.data)})
                if len(rows) >= self.batch_rows:
                    yield pa.Table.from_pylist(rows, schema=schema)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)

    return JobInput


class JobActor(EngineActor):
    """One engine replica per Ray actor: a batch of (index, record, error) in,
    the job's result rows out, plus which actor ran them and its engine's
    statistics (on the last row)."""

    def __init__(self, opts: JobOptions, engine_config, input_format: str, carried: CarriedColumns):
        super().__init__(opts, engine_config, input_format, carried)
        import pyarrow as pa
        import ray

        from .replica import describe_engine

        ctx = ray.get_runtime_context()
        self.label = f"actor-{ctx.get_actor_id()[:8]}"
        gpus = ray.get_gpu_ids()
        self.placement = f"node {ctx.get_node_id()[:8]}" + (f", GPU {','.join(map(str, gpus))}" if gpus else ", cpu")
        self.describe = describe_engine(self.engine, input_format, 0)
        self.schema = job_result_schema(opts, carried).append(pa.field(_WORKER, pa.string())).append(
            pa.field(_META, pa.string())).append(pa.field(_RECORD_ROWS, pa.int64()))

    def __call__(self, batch):
        import collections

        import pyarrow as pa

        from ..io import InputRecord

        records = [InputRecord(i, None if r is None else pickle.loads(r), e)
                   for i, r, e in zip(batch["index"].to_pylist(), batch["record"].to_pylist(), batch["error"].to_pylist())]
        rows = self.results(records)  # every record whole: the batch ran to completion
        per_record = collections.Counter(row["index"] for row in rows)
        for row in rows:
            row[_WORKER] = self.label
            row[_RECORD_ROWS] = per_record[row["index"]]
        rows[-1][_META] = json.dumps({"stats": self.engine.stats(), "describe": self.describe,
                                      "placement": self.placement, "ready_t": self.ready_t}, default=str)
        return pa.Table.from_pylist(rows, schema=self.schema)


def run_ray_job(opts: JobOptions, fmt: str, engine_config, carried: CarriedColumns, done: set[int], err: TextIO,
                resume_command: str):
    """Run (or resume) one shard of the job through Ray Data; returns its JobResult.
    Raises ImportError without Ray and ValueError for an input or size it cannot run."""
    from .runner import finish_job, new_run_id

    if fmt not in RAY_FORMATS:
        raise ValueError(f"--executor ray reads {', '.join(RAY_FORMATS)} inputs, not {fmt!r}; convert the input "
                         "(e.g. to Parquet) or use --executor local")
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.ray_address, log_to_driver=True, include_dashboard=False)
    # Entered after ray.init, which installs a SIGTERM handler of its own (``sys.exit(15)``), and held until the
    # report is written: a SIGTERM at any point of the run (Slurm's preemption) stops it the job's way.
    with StopRequest() as stop:
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the job's own display counts rows
            ctx.print_on_execution_start = False
            actors, num_gpus = _actors(ray, opts, getattr(engine_config, "tensor_parallel_size", 1))
            source = _datasource_class()(input_files(opts.input, fmt), fmt, opts, sorted(done))
            # Read tasks only parse: they must not wait for CPUs the engine actors hold.
            ds = ray.data.read_datasource(source, **_read_task_cpus(ray, 0))
            with warnings.catch_warnings():
                # Bounded retries have no named parameter yet (Ray 2.60 deprecates the generic
                # remote arguments that carry them); without them Ray retries for ever.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                ds = ds.map_batches(JobActor, fn_constructor_kwargs={"opts": opts, "engine_config": engine_config,
                                                                     "input_format": fmt, "carried": carried},
                                    batch_size=opts.effective_max_in_flight, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus,
                                    max_restarts=_ACTOR_RETRIES, max_task_retries=_ACTOR_RETRIES)
            driver = _Driver(opts, fmt, carried, done, err, new_run_id(), actors)
            status = driver.run(ds, stop)
        finally:
            if started:
                ray.shutdown()
        driver.log.write("end", status=status, error=driver.failure or None, counters=driver.counters.as_dict())
        return finish_job(opts, opts.output, status, driver.counters, len(done), first_errors=driver.first_errors,
                          dropped=None, stop=stop, resume_command=resume_command, failure=driver.failure)


def _read_task_cpus(ray, n: float) -> dict:
    import inspect

    # Ray >= 2.51 names the resource; older versions take it in ray_remote_args (deprecated since).
    if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters:
        return {"num_cpus": n}
    return {"ray_remote_args": {"num_cpus": n}}


def _actors(ray, opts: JobOptions, tensor_parallel_size: int) -> tuple[int, float]:
    """(engine actors, GPUs per actor) for this cluster."""
    tp = max(int(tensor_parallel_size or 1), 1)
    gpus = 0 if opts.device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
    size = opts.data_parallel_size
    if size == "auto":
        size = max(gpus // tp, 1)
    if gpus and size * tp > gpus:
        raise ValueError(f"--data-parallel-size {size} x --tensor-parallel-size {tp} needs {size * tp} GPUs; "
                         f"the Ray cluster has {gpus}")
    return size, (tp if gpus else 0)


class _Driver:
    """Takes result batches from the pipeline, drops repeats, commits parts, logs progress."""

    def __init__(self, opts: JobOptions, fmt: str, carried: CarriedColumns, done: set[int], err: TextIO, run_id: str,
                 actors: int):
        self.opts, self.fmt, self.done, self.err, self.actors = opts, fmt, done, err, actors
        self.writer = PartWriter(os.path.join(opts.output, RESULTS), job_result_schema(opts, carried),
                                 shard_index=opts.shard_index, run_id=run_id)
        self.log = ProgressLog(opts.output, opts.shard_index, run_id)
        self.counters = Counters()
        self.first_errors: list[str] = []
        self.failure = ""
        self.seen: set[int] = set()  # indices taken whole this run
        self.gathering: dict[int, dict[int, dict]] = {}  # index -> sample_index -> row, until all rows are in
        self.repeats = 0
        self.workers: dict[str, dict[str, Any]] = {}
        self.started = False
        self.display: Optional[ProgressDisplay] = None
        self.last_commit = time.monotonic()

    def run(self, ds, stop: StopRequest) -> str:
        status = "complete"
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        try:
            for batch in batches:
                self._take(batch)
                if error_rate_exceeded(self.opts, self.counters):
                    status = "aborted"
                    break
                self._maybe_commit()
                if stop.requested:
                    status = "interrupted"
                    break
        except Exception as e:  # Ray surfaces actor and task failures (after its retries) here
            status = "interrupted" if stop.requested and not is_disk_full(e) else "failed"
            self.failure = str(e) if is_disk_full(e) else \
                f"the Ray pipeline failed: {_first_lines(f'{type(e).__name__}: {e}')}"
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the pipeline and its actors when we leave early
        self._start()  # a run with nothing left to do still gets its start event
        try:
            self._commit()
        except OSError as e:
            if not is_disk_full(e):
                raise
            status, self.failure = "failed", self.failure or str(e)
        for label, w in self.workers.items():
            self.log.write("worker_end", worker=label, status="done" if status == "complete" else status,
                           worker_counters=w["counters"].as_dict(), stats=w.get("stats"),
                           device=w.get("device"), device_name=w.get("device_name"), placement=w.get("placement"))
        if self.display is not None:
            self.display.close()
        if self.repeats:
            print(f"[pagedbatch] {self.repeats} rows that Ray ran twice (retries) were kept once", file=self.err,
                  flush=True)
        return status

    def _take(self, batch) -> None:
        meta = None
        for row in batch.to_pylist():
            label, m, record_rows = row.pop(_WORKER), row.pop(_META), row.pop(_RECORD_ROWS)
            if m is not None:
                meta = (label, json.loads(m))
            index = row["index"]
            if index in self.seen or index in self.done:
                self.repeats += 1  # a retried batch or read: the first copy was taken
                continue
            got = self.gathering.setdefault(index, {})
            if row["sample_index"] in got:
                self.repeats += 1
                continue
            got[row["sample_index"]] = row
            if len(got) == record_rows:
                del self.gathering[index]
                self.seen.add(index)
                self._add_record([got[j] for j in sorted(got)], label)
        if meta is not None:
            label, m = meta
            w = self._worker(label)
            w.update(stats=m["stats"], device=m["describe"]["device"], device_name=m["describe"]["device_name"],
                     placement=m["placement"])
            if not self.started:
                self._start(m["describe"], m["ready_t"])
        if self.display is not None:
            self.display.update(self.counters)

    def _add_record(self, rows: list[dict], label: str) -> None:
        # Commits happen between batches, never inside this call: a record's rows share a part.
        for row in rows:
            self.writer.add(row)
        self.counters.add_record(rows)
        self._worker(label)["counters"].add_record(rows)
        note_first_error(self.first_errors, rows)

    def _worker(self, label: str) -> dict[str, Any]:
        return self.workers.setdefault(label, {"counters": Counters()})

    def _start(self, describe: Optional[dict] = None, t: Optional[float] = None) -> None:
        # Written when the first actor's first batch arrives, timed from when that actor had
        # loaded its model, as the local job's start follows the model load.
        if self.started:
            return
        self.started = True
        describe = dict(describe or {"model": self.opts.model, "input_format": self.fmt})
        describe.update(already_committed=len(self.done), executor="ray", data_parallel_size=self.actors,
                        device_name=f"Ray: {self.actors} actor(s), {describe.get('device_name', 'unknown')}")
        self.log.write("start", **describe, **({"t": t} if t else {}))
        self.display = ProgressDisplay(self.opts.quiet, self.opts.log_interval_s, self.opts.max_rows, len(self.done),
                                       stream=self.err)

    def _maybe_commit(self) -> None:
        if commit_due(self.opts, self.writer.pending(), self.last_commit):
            self._commit()

    def _commit(self) -> None:
        path = self.writer.commit()
        self.last_commit = time.monotonic()
        if path is None:
            return
        self.log.write("commit", part=os.path.basename(path), counters=self.counters.as_dict())
        for label, w in self.workers.items():
            self.log.write("worker_progress", worker=label, worker_counters=w["counters"].as_dict(),
                           stats=w.get("stats"), device=w.get("device"), device_name=w.get("device_name"),
                           placement=w.get("placement"))


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


__all__ = ["run_ray_job", "RAY_FORMATS", "JobActor", "input_files"]
