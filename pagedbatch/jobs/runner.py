"""The batch job: stream records through the engine into committed Parquet parts.

``run_job`` does every check that can fail fast (input, model, OUT's
manifest) before loading the model, then drives the engine's
``add_request``/``step`` loop with at most ``max_in_flight`` requests
admitted, committing parts every N rows or T seconds. A part is the unit of
durability: a killed run loses only uncommitted rows, and the rerun skips
every committed index.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO, Union

from ..hub import ModelNotFound, ResolvedModel, resolve_model
from ..io import DiskFull, PartWriter, RowError, cleanup_temp_files, committed_indices, detect_format, open_records
from ..io import is_disk_full, write_openai_batch_output
from ..io.carried import CarriedColumns, decide_carried_columns
from .manifest import RESULTS, ManifestMismatch, build_manifest, forget_unstarted_job, job_model_name, prepare_output_dir
from .options import JobOptions
from .out_lock import OutputLock, OutputLocked
from .ordering import admission_order
from .prepare import Prepared, RowPreparer
from .progress import Counters, ProgressDisplay, ProgressLog
from .replica import Replica, describe_engine, drive, error_rate_exceeded, job_result_schema
from .report import write_report
from .signals import StopRequest

EXIT_FAILED = 1
EXIT_ERROR_RATE = 3


class JobError(Exception):
    """A problem that stops the job before any work (bad input, model or OUT)."""


class JobUsageError(JobError):
    """A JobError that is a bad option value found once the model's tokenizer is known (a --json-schema,
    --regex or --choice that cannot compile): the command line exits 2 for it, as for other bad values."""


@dataclass
class JobResult:
    status: str  # complete | interrupted | aborted | failed
    exit_code: int
    out: str
    counters: Counters
    message: str
    report: dict = field(default_factory=dict)



def run_job(opts: JobOptions, *, resume_command: str = "the same command", stderr: Optional[TextIO] = None,
            lock: Optional[OutputLock] = None) -> JobResult:
    """Run (or resume) one shard of a batch job. Raises JobError before any
    work for a bad input, model or output directory. ``lock``: the shard's
    output lock when the caller already holds it (it wrote the input into OUT
    under it); the caller releases it."""
    err = stderr or sys.stderr
    out = opts.output
    if os.path.isdir(opts.input) and _within(out, opts.input):
        # The next run would read the committed parts (and the input fingerprint would change under the job).
        raise JobError(f"the output directory {out} is inside the input directory {opts.input}: its result files "
                       "would be read back as input rows, and the job could never resume. Use an --output outside "
                       "the input directory")
    try:
        fmt = detect_format(opts.input, opts.input_format)
        records = open_records(opts.input, fmt, batch_rows=opts.read_batch_rows)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise JobError(f"cannot read the input: {e}") from None
    try:
        check_input_options(opts, fmt)
        carried, warnings = decide_carried_columns(opts.input, fmt, opts.keep_columns)
    except (ValueError, OSError) as e:
        raise JobError(str(e)) from None
    for warning in warnings:
        print(f"[pagedbatch] {warning}", file=err, flush=True)
    model, tokenizer = _resolve_models(opts, err)
    try:
        engine_config = opts.engine_config(model.path, tokenizer.path if tokenizer else None)
        _check_max_model_len(opts, engine_config)
        _check_default_structured_output(opts, engine_config)
        slots = _worker_slots(opts, engine_config) if opts.executor == "local" else []
    except (ValueError, OSError) as e:
        raise JobError(str(e)) from None
    held = lock is not None
    lock = lock or take_output_lock(out, opts.shard_index, opts.overwrite)
    try:
        return _run_locked(opts, fmt, model, tokenizer, carried, engine_config, slots, records, err, resume_command)
    finally:
        if not held:
            lock.release()


def take_output_lock(out: str, shard_index: int, overwrite: bool) -> OutputLock:
    """The shard's output lock, held; JobError when another run holds it or OUT is unusable."""
    lock = OutputLock(out, shard_index, overwrite)
    try:
        lock.acquire()
    except OutputLocked as e:
        raise JobError(str(e)) from None
    except OSError as e:
        raise JobError(f"cannot use the output directory {out}: {e}") from None
    return lock


def _run_locked(opts: JobOptions, fmt: str, model: ResolvedModel, tokenizer: Optional[ResolvedModel],
                carried: CarriedColumns, engine_config, slots: list, records: Iterator, err: TextIO,
                resume_command: str) -> JobResult:
    """``run_job`` from OUT's manifest on, under the shard's output lock."""
    out = opts.output
    try:
        state = prepare_output_dir(out, build_manifest(opts, fmt, model, tokenizer, carried), opts.overwrite)
    except ManifestMismatch as e:
        raise JobError(str(e)) from None
    except (ValueError, OSError) as e:
        raise JobError(str(e)) from None
    try:
        return _run_prepared(opts, fmt, model, carried, engine_config, slots, records, err, resume_command, state)
    except JobError:
        if state != "resume":
            # Nothing ran (a model that fails to load, say): leave OUT as it was found, so that the command
            # corrected is a new job rather than "another job" than this one that never started.
            forget_unstarted_job(out, opts.shard_index)
        raise


def _run_prepared(opts: JobOptions, fmt: str, model: ResolvedModel, carried: CarriedColumns, engine_config,
                  slots: list, records: Iterator, err: TextIO, resume_command: str, state: str) -> JobResult:
    out = opts.output
    results_dir = os.path.join(out, RESULTS)
    cleanup_temp_files(results_dir, shard_index=opts.shard_index)
    try:
        # This shard's: the others' rows are skipped by index anyway, and counting them told a shard's
        # user that rows it never ran were committed earlier.
        done = {i for i in committed_indices(results_dir) if i % opts.num_shards == opts.shard_index}
    except ValueError as e:  # a damaged part: its message says what to do
        raise JobError(str(e)) from None
    if state == "resume" and not opts.quiet:
        print(f"[pagedbatch] resuming in {out}: {len(done)} rows already committed are skipped", file=err, flush=True)
    if opts.executor == "ray":
        from .ray_executor import run_ray_job

        try:
            return run_ray_job(opts, fmt, engine_config, carried, done, err, resume_command)
        except (ImportError, ValueError) as e:
            raise JobError(str(e)) from None
    if len(slots) > 1:
        return _run_data_parallel(opts, slots, fmt, engine_config, carried, records, done, err, resume_command)

    from ..engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(engine_config)
    except Exception as e:  # loader errors come in many types; the user needs the path and the cause
        raise JobError(f"could not load the model from {model.path}: {type(e).__name__}: {e}") from e
    try:
        try:
            job = _Job(opts, engine, fmt, carried, out, done, err)
        except ValueError as e:  # a default --json-schema/--regex/--choice that does not compile
            raise JobError(str(e)) from None
        with StopRequest() as stop:
            return job.run(records, stop, resume_command)
    finally:
        engine.shutdown()  # tensor-parallel workers end with the job


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_input_options(opts: JobOptions, fmt: str) -> None:
    """Options that cannot apply to this input format (ValueError naming them)."""
    if fmt != "openai" and opts.id_field != "id":
        # Without its field a row's id is its index, by design for the default name; a name given on purpose
        # and found in no record is a typo that would silently number every row.
        from ..io.carried import input_field_names

        names = input_field_names(opts.input, fmt, wanted=opts.id_field)
        if opts.id_field not in names:
            raise JobUsageError(f"id_field (--id-field) {opts.id_field!r} is in no record of {opts.input} (its "
                                f"fields: {', '.join(sorted(names)) or 'none'})")
    if fmt == "openai":
        for name, value in (("prompt_template", opts.template_text), ("system_prompt", opts.system_prompt)):
            if value is not None:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) does not apply to an OpenAI batch input: "
                                 "each request carries its own prompt or messages")


def _check_max_model_len(opts: JobOptions, engine_config) -> None:
    """--max-model-len against the model's config, before OUT is touched: a JobUsageError (exit 2), where
    the engine's own check comes after OUT's manifest is written and the weights are read."""
    if opts.max_model_len is None:
        return
    from ..engine.llm_engine import model_length_limit
    from ..engine.models.config import ModelArgs

    try:
        limit = model_length_limit(ModelArgs.from_dir(engine_config.model))
    except Exception:  # the model's own load reports a bad config, with the path and the cause
        return
    if opts.max_model_len > limit:
        raise JobUsageError(f"max_model_len (--max-model-len) {opts.max_model_len} exceeds "
                            f"the model's limit of {limit} tokens (its config.json in {engine_config.model})")


def _check_default_structured_output(opts: JobOptions, engine_config) -> None:
    """Options that need the tokenizer, checked with it alone before OUT is touched or a model loaded:
    --system-prompt needs a chat template (without one every row failed, each with a message about
    'messages' the row never gave), and --json-schema / --regex / --choice must compile. A JobUsageError
    naming the option, in seconds."""
    if opts.system_prompt is not None:
        from ..engine.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(engine_config.tokenizer or engine_config.model)
        except Exception as e:  # the model's own load reports this again, with the path and the cause
            raise JobError(f"could not load the tokenizer of {engine_config.tokenizer or engine_config.model}: "
                           f"{type(e).__name__}: {e}") from e
        if not getattr(tok, "chat_template", None):
            raise JobUsageError(
                f"system_prompt (--system-prompt) needs a chat template, and the tokenizer of "
                f"{engine_config.tokenizer or engine_config.model} has none. Put the instruction into the prompt "
                "instead (--prompt-template 'Instruction: ... {{ prompt }}'), or use a chat model")
    if opts.default_structured_output() is None:
        return
    from ..engine.models.config import ModelArgs
    from ..engine.structured import GrammarCompilerCache
    from ..engine.tokenizer import eos_token_ids, load_tokenizer
    from ..sampling_params import SamplingParams
    from ..structured_output import StructuredOutputError
    from .options import structured_option_name

    model_dir = engine_config.model
    try:
        tokenizer = load_tokenizer(engine_config.tokenizer or model_dir)
        args = ModelArgs.from_dir(model_dir)
    except Exception as e:  # the model's own load reports this again, with the path and the cause
        raise JobError(f"could not load the tokenizer or config of {model_dir}: {type(e).__name__}: {e}") from e
    grammars = GrammarCompilerCache(tokenizer, args.vocab_size, eos_token_ids(model_dir, tokenizer, args.eos_token_id))
    try:
        grammars.check(SamplingParams.from_dict(opts.default_sampling()))
    except StructuredOutputError as e:
        raise JobUsageError(f"{structured_option_name(opts)}: {e.problem}") from None


def _worker_slots(opts: JobOptions, engine_config) -> list:
    """Data-parallel worker slots; one slot means the engine runs in this process."""
    if opts.data_parallel_size == 1:
        return [None]
    from .data_parallel import cpu_count, cuda_device_count, plan_workers, visible_gpus

    tp = engine_config.tensor_parallel_size  # each worker's engine spans this many GPUs
    gpus = visible_gpus(os.environ, cuda_device_count(opts.device))
    return plan_workers(opts.data_parallel_size, tp, opts.device, gpus, cpu_count())


def _run_data_parallel(opts: JobOptions, slots: list, fmt: str, engine_config, carried: CarriedColumns,
                       records: Iterator, done: set[int], err: TextIO, resume_command: str) -> JobResult:
    from ..engine.models.config import ModelArgs
    from ..engine.structured import GrammarCompilerCache
    from ..engine.tokenizer import eos_token_ids, load_tokenizer, prompt_token_ids
    from .data_parallel import DataParallelJob

    model_dir = engine_config.model
    run_id = new_run_id()
    log = ProgressLog(opts.output, opts.shard_index, run_id)
    job = DataParallelJob(opts, slots, engine_config=engine_config, carried=carried, input_format=fmt, run_id=run_id,
                          already_committed=len(done), log=log, err=err)
    with StopRequest() as stop:
        try:
            job.start()  # the workers load the model while this process loads the tokenizer
            try:
                # This process prepares rows (tokenizes, validates) with the tokenizer alone.
                tokenizer = load_tokenizer(engine_config.tokenizer or model_dir)
                args = ModelArgs.from_dir(model_dir)
                vocab_size = args.vocab_size
            except Exception as e:  # as for the model: the user needs the path and the cause
                raise JobError(f"could not load the tokenizer or config of {model_dir}: "
                               f"{type(e).__name__}: {e}") from e
            # Rows' grammars are compiled here to turn bad ones into error rows; workers compile their own.
            grammars = GrammarCompilerCache(tokenizer, vocab_size, eos_token_ids(model_dir, tokenizer, args.eos_token_id))
            try:
                preparer = RowPreparer(opts, fmt, tokenizer, functools.partial(prompt_token_ids, tokenizer, vocab_size),
                                       carried=carried, check_structured=grammars.check)
            except ValueError as e:  # a default --json-schema/--regex/--choice that does not compile
                raise JobError(str(e)) from None
            status = job.run(todo_items(opts, records, done, preparer), stop)
        except BaseException as e:  # a second Ctrl-C, or a bug: quit soon, keeping what workers finished
            job.close(grace_s=5.0)
            if job.dealing:
                log.write("end", status="failed", error=f"{type(e).__name__}: {e}", counters=job.counters.as_dict())
            raise
        finally:
            job.close()
        if status == "failed" and not job.dealing:
            raise JobError(job.failure)  # no worker started work: like a model that fails to load
        # Still under the job's handlers: a SIGTERM now must not end the process before the report is written.
        log_end(log, status=status, error=job.failure or None, counters=job.counters.as_dict())
        return finish_job(opts, opts.output, status, job.counters, len(done), first_errors=job.first_errors,
                          dropped=job.dropped, stop=stop, resume_command=resume_command, failure=job.failure)


def _resolve_models(opts: JobOptions, err: TextIO) -> tuple[ResolvedModel, Optional[ResolvedModel]]:
    """The model (and a separate tokenizer) as local directories: a directory as given, or a
    Hugging Face Hub id's snapshot; the demo model without --model."""
    if opts.model is None:
        from ..demo import DEMO_NOTICE, demo_model_dir

        print(f"[pagedbatch] {DEMO_NOTICE}", file=err, flush=True)
        model = ResolvedModel(demo_model_dir())
    else:
        model = _resolve(opts.model, opts.revision, "model")
        if not os.path.isfile(os.path.join(model.path, "config.json")):
            raise JobError(f"{opts.model} is not a Hugging Face model directory: it has no config.json"
                           + (f" ({model.path})" if model.repo_id else ""))
    tokenizer = None if opts.tokenizer is None else _resolve(opts.tokenizer, opts.tokenizer_revision, "tokenizer")
    return model, tokenizer


def _resolve(name: str, revision: Optional[str], what: str) -> ResolvedModel:
    try:
        return resolve_model(name, revision, what=what)
    except (ModelNotFound, ValueError) as e:
        raise JobError(str(e)) from None


class _Job:
    """The single-process job: one replica fed straight from the record stream."""

    def __init__(self, opts: JobOptions, engine, fmt: str, carried: CarriedColumns, out: str, done: set[int],
                 err: TextIO):
        self.opts = opts
        self.engine = engine
        self.fmt = fmt
        self.out = out
        self.done = done
        self.err = err
        self.run_id = new_run_id()
        self.log = ProgressLog(out, opts.shard_index, self.run_id)
        writer = PartWriter(os.path.join(out, RESULTS), job_result_schema(opts, carried), shard_index=opts.shard_index,
                            run_id=self.run_id)
        self.replica = Replica(opts, engine, writer, self._on_commit)
        self.preparer = RowPreparer(opts, fmt, engine.tokenizer, engine.validate_prompt, carried=carried,
                                    check_structured=engine.check_structured_output)

    def _on_commit(self, part: str, counters: Counters, stats: dict) -> None:
        self.log.write("commit", part=part, counters=counters.as_dict(), stats=stats)

    def run(self, records: Iterator, stop: StopRequest, resume_command: str) -> JobResult:
        opts, rep = self.opts, self.replica
        self.log.write("start", **describe_engine(self.engine, self.fmt, len(self.done)))
        display = ProgressDisplay(opts.quiet, opts.log_interval_s, opts.max_rows, len(self.done), stream=self.err)
        todo = todo_items(opts, records, self.done, self.preparer)
        status = "complete"

        def between_steps() -> bool:
            nonlocal status
            display.update(rep.counters)
            if error_rate_exceeded(opts, rep.counters, rep.counters.records + len(rep.in_flight)):
                status = "aborted"
                return False
            rep.maybe_commit()
            if stop.requested:
                status = "interrupted"
                return False
            return True

        from ..engine.distributed import WorkerDiedError

        failure = ""
        try:
            try:
                drive(rep, todo, opts.effective_max_in_flight, between_steps)
            except WorkerDiedError as e:  # a tensor-parallel worker died or got stuck: failed, as a data-parallel one
                status, failure = "failed", f"{type(e).__name__}: {e}"
            dropped = rep.abort_in_flight()
            rep.commit()
        except DiskFull as e:
            # Committing again would fail the same way: stop with the one message that says what to do.
            dropped = rep.abort_in_flight()  # the message counts the finished rows it could not commit
            status, failure = "failed", str(e)
        except BaseException as e:
            # Rows already finished are valid: keep them, then let the error surface.
            rep.abort_in_flight()
            rep.commit()
            self.log.write("end", status="failed", error=f"{type(e).__name__}: {e}", counters=rep.counters.as_dict(),
                           stats=self.engine.stats())
            display.close()
            raise
        display.close()
        log_end(self.log, status=status, error=failure or None, counters=rep.counters.as_dict(),
                stats=self.engine.stats())
        return finish_job(opts, self.out, status, rep.counters, len(self.done), first_errors=rep.first_errors,
                          dropped=dropped, stop=stop, resume_command=resume_command, failure=failure)


def log_end(log: ProgressLog, **fields) -> None:
    """The progress log's "end" event; on a full disk the run ends without it (the
    report then shows the run as killed, and the rerun's events follow intact)."""
    try:
        log.write("end", **fields)
    except OSError as e:
        if not is_disk_full(e):
            raise


def new_run_id() -> str:
    # Time and pid alone repeat when a job is rerun within the same second
    # (e.g. --overwrite right after a run); a random tail keeps part names unique.
    return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def todo_items(opts: JobOptions, records: Iterator, done: set[int],
               preparer: RowPreparer) -> Iterator[Union[Prepared, RowError]]:
    """This shard's uncommitted records (up to --max-rows), prepared, in admission order.

    An OpenAI batch request whose custom_id an earlier request of the file already has is an error row (OpenAI
    refuses such a file; output.jsonl would hold two answers under one id). Every record's id is seen, in
    every shard and every run (committed ones too), so which one is the repeat never depends on a crash."""
    first_with_id: dict[str, int] = {}

    def repeat(rec) -> Optional[RowError]:
        cid = rec.data.get("custom_id") if isinstance(rec.data, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, (str, int)) or cid == "":
            return None  # the record's own parse reports a bad or missing id
        first = first_with_id.setdefault(str(cid), rec.index)
        if first == rec.index:
            return None
        return RowError(rec.index, str(cid), f"field 'custom_id': {str(cid)!r} is already the custom_id of the "
                        f"request at index {first}: the ids of an OpenAI batch file must be unique")

    def todo() -> Iterator:
        for rec in records:
            if opts.max_rows is not None and rec.index >= opts.max_rows:
                return
            bad = repeat(rec) if preparer.fmt == "openai" else None
            if rec.index % opts.num_shards != opts.shard_index or rec.index in done:
                continue
            yield bad if bad is not None else preparer.prepare(rec)

    return admission_order(todo(), opts.order, opts.order_window,
                           key_ids=lambda p: p.token_ids, hold=lambda it: isinstance(it, Prepared))


def finish_job(opts: JobOptions, out: str, status: str, c: Counters, committed_before: int, *,
               first_errors: list[str], dropped: Optional[int], stop: StopRequest, resume_command: str,
               failure: str = "") -> JobResult:
    """Write the report (and output.jsonl) and say how the run ended: complete,
    interrupted, aborted (error rate) or failed (a worker or the Ray pipeline
    failed). ``dropped``: requests abandoned unfinished, None when unknown (Ray)."""
    results = os.path.join(out, RESULTS)
    try:
        report = write_report(out)
    except OSError as e:
        if status != "failed" or not is_disk_full(e):
            raise
        report = {}  # the disk is full: `pagedbatch report OUT` rebuilds it later
    unfinished = "unfinished requests were" if dropped is None else f"{dropped} in-flight requests were"
    if status == "complete":
        if opts.output_format == "jsonl" and opts.num_shards == 1:
            write_openai_batch_output(results, os.path.join(out, "output.jsonl"), model=job_model_name(out))
        message = (f"done: {c.describe_rows()} this run ({c.describe_errors()}, {committed_before} committed earlier); "
                   f"results in {results}, report in {os.path.join(out, 'report.md')}")
        if report.get("status") != "complete" and opts.num_shards > 1:
            message += f"; shard {opts.shard_index} of {opts.num_shards} is done, others may still be running"
        return JobResult(status, 0, out, c, message, report)
    if status == "interrupted":
        message = (f"interrupted by {stop.name}: {c.describe_rows()} committed this run; {unfinished} "
                   f"dropped and will be redone. Partial report in {os.path.join(out, 'report.md')}. "
                   f"To resume, run the same command again:\n  {resume_command}")
        return JobResult(status, stop.exit_code, out, c, message, report)
    if status == "failed":
        # The counters include rows a failed commit lost: the parts are the truth.
        committed = report.get("rows", {}).get("total")
        kept = f"{committed} rows are committed in all" if committed is not None else "committed rows are kept"
        message = (f"failed: {failure}\n{kept} ({results}); {unfinished} dropped and will be redone. Fix the "
                   f"cause, then resume with the same command:\n  {resume_command}")
        return JobResult(status, EXIT_FAILED, out, c, message, report)
    # The abort was decided over the records taken in, finished or still in flight (error_rate_exceeded): say
    # those numbers. Over finished records alone, bad rows (which finish at once) read as "40 of 40 failed".
    taken = c.records + (dropped or 0)
    rate = c.failed_records / max(taken, 1)
    unit = "rows" if c.rows == c.records else "records"
    dropped_note = f"; {dropped} of them were unfinished and were dropped" if dropped else ""
    message = (f"aborted: {c.failed_records} of the {taken} {unit} taken in failed ({rate:.1%}), above "
               f"--max-error-rate {opts.max_error_rate:g}{dropped_note}. First errors:\n  " + "\n  ".join(first_errors) +
               f"\nFinished rows were committed ({results}). Fix the input and rerun "
               "with --overwrite, or raise --max-error-rate.")
    return JobResult(status, EXIT_ERROR_RATE, out, c, message, report)
