"""The batch job: stream records through the engine into committed Parquet parts.

``run_job`` does every check that can fail fast (input, model, OUT's
manifest) before loading the model, then drives the engine's
``add_request``/``step`` loop with at most ``max_in_flight`` requests
admitted, committing parts every N rows or T seconds. A part is the unit of
durability: a killed run loses only uncommitted rows, and the rerun skips
every committed index.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, TextIO

from ..io import (
    FieldNames, ParsedRequest, PartWriter, RowError, cleanup_temp_files, committed_indices, detect_format,
    open_records, parse_record, result_schema, write_openai_batch_output,
)
from ..sampling_params import SamplingParams
from .manifest import RESULTS, ManifestMismatch, build_manifest, prepare_output_dir
from .options import JobOptions
from .ordering import admission_order
from .progress import Counters, ProgressDisplay, ProgressLog
from .report import write_report
from .signals import StopRequest

EXIT_ERROR_RATE = 3


class JobError(Exception):
    """A problem that stops the job before any work (bad input, model or OUT)."""


@dataclass
class JobResult:
    status: str  # complete | interrupted | aborted
    exit_code: int
    out: str
    counters: Counters
    message: str
    report: dict = field(default_factory=dict)


@dataclass
class _Pending:
    index: int
    id: str
    prompt: Optional[str]
    is_chat: bool
    field: str


@dataclass
class _Prepared:
    token_ids: list[int]
    params: SamplingParams
    pending: _Pending


_END = object()


def run_job(opts: JobOptions, *, resume_command: str = "the same command", stderr: Optional[TextIO] = None) -> JobResult:
    """Run (or resume) one shard of a batch job. Raises JobError before any
    work for a bad input, model or output directory."""
    err = stderr or sys.stderr
    out = opts.output
    try:
        fmt = detect_format(opts.input, opts.input_format)
        records = open_records(opts.input, fmt, batch_rows=opts.read_batch_rows)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise JobError(f"cannot read the input: {e}") from None
    model_dir = _model_dir(opts, err)
    try:
        engine_config = opts.engine_config(model_dir)
        state = prepare_output_dir(out, build_manifest(opts, fmt, model_dir), opts.overwrite)
    except ManifestMismatch as e:
        raise JobError(str(e)) from None
    except (ValueError, OSError) as e:
        raise JobError(str(e)) from None
    results_dir = os.path.join(out, RESULTS)
    cleanup_temp_files(results_dir, shard_index=opts.shard_index)
    done = committed_indices(results_dir)
    if state == "resume" and not opts.quiet:
        print(f"[pagedbatch] resuming in {out}: {len(done)} rows already committed are skipped", file=err, flush=True)

    from ..engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(engine_config)
    except Exception as e:  # loader errors come in many types; the user needs the path and the cause
        raise JobError(f"could not load the model from {model_dir}: {type(e).__name__}: {e}") from e
    try:
        job = _Job(opts, engine, fmt, out, done, err)
        with StopRequest() as stop:
            return job.run(records, stop, resume_command)
    finally:
        engine.shutdown()  # tensor-parallel workers end with the job


def _model_dir(opts: JobOptions, err: TextIO) -> str:
    if opts.model is None:
        from ..demo import DEMO_NOTICE, demo_model_dir

        print(f"[pagedbatch] {DEMO_NOTICE}", file=err, flush=True)
        return demo_model_dir()
    if not os.path.isdir(opts.model):
        raise JobError(f"model directory not found: {opts.model} (give --model a local Hugging Face model directory)")
    if not os.path.isfile(os.path.join(opts.model, "config.json")):
        raise JobError(f"{opts.model} is not a Hugging Face model directory: it has no config.json")
    return opts.model


class _Job:
    def __init__(self, opts: JobOptions, engine, fmt: str, out: str, done: set[int], err: TextIO):
        self.opts = opts
        self.engine = engine
        self.fmt = fmt
        self.out = out
        self.done = done
        self.err = err
        self.fields = FieldNames(opts.prompt_field, opts.messages_field, opts.prompt_token_ids_field, opts.id_field)
        self.defaults = opts.default_sampling()
        schema = result_schema(opts.include_prompt, opts.include_token_ids, opts.include_logprobs)
        if opts.output_format == "jsonl":
            import pyarrow as pa

            schema = schema.append(pa.field("is_chat", pa.bool_()))
        # Time and pid alone repeat when a job is rerun within the same second
        # (e.g. --overwrite right after a run); a random tail keeps part names unique.
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.writer = PartWriter(os.path.join(out, RESULTS), schema, shard_index=opts.shard_index, run_id=self.run_id)
        self.log = ProgressLog(out, opts.shard_index, self.run_id)
        self.counters = Counters()
        self.in_flight: dict[str, _Pending] = {}
        self.first_errors: list[str] = []
        self.last_commit = time.monotonic()

    # -- the loop ----------------------------------------------------------

    def run(self, records: Iterator, stop: StopRequest, resume_command: str) -> JobResult:
        opts = self.opts
        self.log.write("start", **self._describe_engine())
        display = ProgressDisplay(opts.quiet, opts.log_interval_s, opts.max_rows, len(self.done), stream=self.err)
        todo = admission_order((self._prepare(r) for r in self._todo(records)), opts.order, opts.order_window,
                               key_ids=lambda p: p.token_ids)
        exhausted = False
        status, message = "complete", ""
        try:
            while True:
                if stop.requested:
                    status = "interrupted"
                    break
                while not exhausted and len(self.in_flight) < opts.effective_max_in_flight:
                    prep = next(todo, _END)
                    if prep is _END:
                        exhausted = True
                        break
                    if prep is not None:
                        self._submit(prep)
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            self._finish(output)
                elif exhausted:
                    break
                display.update(self.counters)
                if self._error_rate_exceeded():
                    status = "aborted"
                    break
                self._maybe_commit()
        except BaseException as e:
            # Rows already finished are valid: keep them, then let the error surface.
            self._abort_in_flight()
            self._commit()
            self.log.write("end", status="failed", error=f"{type(e).__name__}: {e}", counters=self.counters.as_dict(),
                           stats=self.engine.stats())
            display.close()
            raise
        dropped = self._abort_in_flight()
        self._commit()
        display.close()
        self.log.write("end", status=status, counters=self.counters.as_dict(), stats=self.engine.stats())
        report = write_report(self.out)
        c = self.counters
        if status == "complete":
            if opts.output_format == "jsonl" and opts.num_shards == 1:
                write_openai_batch_output(os.path.join(self.out, RESULTS), os.path.join(self.out, "output.jsonl"))
            message = (f"done: {c.rows} rows this run ({c.errors} errors, {len(self.done)} committed earlier); "
                       f"results in {os.path.join(self.out, RESULTS)}, report in {os.path.join(self.out, 'report.md')}")
            if report.get("status") != "complete" and opts.num_shards > 1:
                message += f"; shard {opts.shard_index} of {opts.num_shards} is done, others may still be running"
            return JobResult(status, 0, self.out, c, message, report)
        if status == "interrupted":
            message = (f"interrupted by {stop.name}: {c.rows} rows committed this run; {dropped} in-flight requests "
                       f"were dropped and will be redone. Partial report in {os.path.join(self.out, 'report.md')}. "
                       f"To resume, run the same command again:\n  {resume_command}")
            return JobResult(status, stop.exit_code, self.out, c, message, report)
        rate = c.errors / max(c.rows, 1)
        message = (f"aborted: {c.errors} of {c.rows} rows failed ({rate:.1%}), above --max-error-rate "
                   f"{opts.max_error_rate:g}. First errors:\n  " + "\n  ".join(self.first_errors) +
                   f"\nFinished rows were committed ({os.path.join(self.out, RESULTS)}). Fix the input and rerun "
                   "with --overwrite, or raise --max-error-rate.")
        return JobResult(status, EXIT_ERROR_RATE, self.out, c, message, report)

    def _todo(self, records: Iterator) -> Iterator:
        opts = self.opts
        for rec in records:
            if opts.max_rows is not None and rec.index >= opts.max_rows:
                return
            if rec.index % opts.num_shards != opts.shard_index or rec.index in self.done:
                continue
            yield rec

    # -- one record in -------------------------------------------------------

    def _prepare(self, rec) -> Optional["_Prepared"]:
        """Parse, validate and tokenize one record; a bad one becomes an error row here (None)."""
        parsed = parse_record(rec, self.fields, self.fmt)
        if isinstance(parsed, RowError):
            self._error_row(parsed.index, parsed.id, parsed.error)
            return None
        assert isinstance(parsed, ParsedRequest)
        try:
            params = SamplingParams.from_dict({**self.defaults, **parsed.sampling})
        except ValueError as e:
            # SamplingParams' messages start with the field's name.
            name = str(e).split(" ", 1)[0]
            where = f"field {name!r}" if name in SamplingParams.__dataclass_fields__ else "sampling"
            self._error_row(parsed.index, parsed.id, f"{where}: invalid value: {e}")
            return None
        if self.opts.include_logprobs and params.logprobs is None:
            params = params.replace(logprobs=0)
        if parsed.messages is not None:
            field_name = self.fields.messages if self.fmt != "openai" else "body.messages"
            try:
                from ..engine.tokenizer import encode_chat

                prompt: Any = encode_chat(self.engine.tokenizer, parsed.messages)
            except Exception as e:  # jinja and tokenizer errors: the row is bad, not the job
                self._error_row(parsed.index, parsed.id, f"field {field_name!r}: cannot render the chat: {e}")
                return None
            text = json.dumps(parsed.messages, ensure_ascii=False)
        elif parsed.prompt is not None:
            field_name = self.fields.prompt if self.fmt != "openai" else "body.prompt"
            prompt = text = parsed.prompt
        else:
            field_name = self.fields.prompt_token_ids if self.fmt != "openai" else "body.prompt"
            prompt, text = parsed.prompt_token_ids, None
        try:
            ids = self.engine.validate_prompt(prompt)
        except (ValueError, TypeError) as e:
            self._error_row(parsed.index, parsed.id, f"field {field_name!r}: {e}")
            return None
        return _Prepared(ids, params, _Pending(parsed.index, parsed.id, text, parsed.messages is not None, field_name))

    def _submit(self, prep: "_Prepared") -> None:
        p = prep.pending
        request_id = str(p.index)
        try:
            self.engine.add_request(request_id, prep.token_ids, prep.params)
        except (ValueError, TypeError) as e:
            self._error_row(p.index, p.id, f"field {p.field!r}: {e}")
            return
        self.in_flight[request_id] = p

    # -- one result out --------------------------------------------------------

    def _finish(self, output) -> None:
        pending = self.in_flight.pop(output.request_id)
        t = output.timings
        ok = output.finish_reason != "error"
        row = {
            "index": pending.index, "id": pending.id,
            "output": output.text if ok else None,
            "finish_reason": output.finish_reason, "error": output.error,
            "prompt_tokens": output.prompt_tokens, "output_tokens": output.output_tokens,
            "queue_s": t.queue_s, "ttft_s": t.ttft_s, "latency_s": t.latency_s, "tpot_s": output.tpot_s,
            "num_preemptions": output.num_preemptions,
        }
        if self.opts.include_prompt:
            row["prompt"] = pending.prompt
        if self.opts.include_token_ids:
            row["prompt_token_ids"] = list(output.prompt_token_ids)
            row["output_token_ids"] = list(output.token_ids)
        if self.opts.include_logprobs:
            row["logprobs"] = [lp.logprob for lp in output.logprobs] if output.logprobs else None
        if self.opts.output_format == "jsonl":
            row["is_chat"] = pending.is_chat
        if not ok:
            row["error"] = f"field {pending.field!r}: {output.error}"
            self._note_error(pending.index, row["error"])
        self._add(row)

    def _error_row(self, index: int, row_id: str, error: str) -> None:
        row: dict[str, Any] = {"index": index, "id": row_id, "output": None, "finish_reason": "error",
                               "error": error, "output_tokens": 0}
        self._note_error(index, error)
        self._add(row)

    def _note_error(self, index: int, error: Optional[str]) -> None:
        if len(self.first_errors) < 5:
            self.first_errors.append(f"row {index}: {error}")

    def _add(self, row: dict) -> None:
        self.writer.add(row)
        self.counters.add(row)

    # -- commits, errors, stopping ---------------------------------------------

    def _maybe_commit(self) -> None:
        n = self.writer.pending()
        if n >= self.opts.commit_every or (n and time.monotonic() - self.last_commit >= self.opts.commit_interval_s):
            self._commit()

    def _commit(self) -> None:
        path = self.writer.commit()
        self.last_commit = time.monotonic()
        if path is not None:
            self.log.write("commit", part=os.path.basename(path), counters=self.counters.as_dict(),
                           stats=self.engine.stats())

    def _error_rate_exceeded(self) -> bool:
        limit, c = self.opts.max_error_rate, self.counters
        return limit is not None and c.rows >= self.opts.error_rate_min_rows and c.errors / c.rows > limit

    def _abort_in_flight(self) -> int:
        # Aborted requests are not written, so a resume redoes them from scratch.
        n = len(self.in_flight)
        for request_id in list(self.in_flight):
            self.engine.abort_request(request_id)
        self.in_flight.clear()
        return n

    def _describe_engine(self) -> dict[str, Any]:
        runner = self.engine.runner
        device = str(getattr(runner, "device", "unknown"))
        return {
            "model": self.engine.config.model,
            "dtype": str(getattr(runner, "dtype", "unknown")).replace("torch.", ""),
            "device": device,
            "device_name": _device_name(device),
            "engine_config": self.engine.config.to_dict(),
            "max_model_len": self.engine.max_model_len,
            "input_format": self.fmt,
            "already_committed": len(self.done),
        }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # a name is only for the report
            return "cuda"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
