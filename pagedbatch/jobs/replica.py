"""One engine's share of a job: prepared rows in, committed Parquet parts out.

A ``Replica`` admits ``Prepared`` requests to one ``LLMEngine``, steps it,
turns finished outputs (and ``RowError`` rows) into result rows and commits
them as parts every N rows or T seconds. A record of n samples is one
request; its n outputs gather in its ``Pending`` and its n rows go to the
writer together once the last is in, so a part never holds part of a
record. The single-process job drives one replica; each data-parallel
worker process drives its own, writing parts under its own name into the
same results directory; a Ray actor drives one over a batch and hands the
rows back to the job's driver. Where rows come from and when to stop is the
caller's business.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, Iterator, Optional, Union

from ..io import PartWriter, RowError, result_schema
from ..engine.token_bytes import TokenBytes
from ..io.carried import CarriedColumns
from ..openai_logprobs import chat_logprobs, completion_logprobs
from .options import JobOptions
from .prepare import Pending, Prepared
from .progress import Counters

# (part file name, this replica's counters, the engine's statistics) after each commit.
OnCommit = Callable[[str, Counters, dict], None]


def job_result_schema(opts: JobOptions, carried: CarriedColumns = CarriedColumns()):
    """The job's result parts' schema: the result columns its options ask for,
    then the carried input columns (decided once per job, so every part,
    worker and resumed run writes the same schema)."""
    schema = result_schema(opts.include_prompt, opts.include_token_ids, opts.include_logprobs)
    if opts.output_format == "jsonl":
        import pyarrow as pa

        schema = schema.append(pa.field("is_chat", pa.bool_()))
        # The OpenAI logprobs object of a row that asked for them, as JSON (its shape depends on is_chat).
        schema = schema.append(pa.field("openai_logprobs", pa.string()))
    for f in carried.fields:
        schema = schema.append(f)
    return schema


class Replica:
    def __init__(self, opts: JobOptions, engine, writer: PartWriter, on_commit: OnCommit):
        self.opts = opts
        self.engine = engine
        self.writer = writer
        self.on_commit = on_commit
        self.counters = Counters()
        self.in_flight: dict[str, Pending] = {}
        self.samples_in_flight = 0  # the in-flight records' unfinished samples: what --max-in-flight bounds
        self.first_errors: list[str] = []
        self.last_commit = time.monotonic()
        self._token_bytes: Optional[TokenBytes] = None  # built on the first OpenAI logprobs row

    def add(self, item: Union[Prepared, RowError]) -> None:
        """Admit a prepared request to the engine, or write an error row."""
        if isinstance(item, RowError):
            self._error_row(item.index, item.id, item.error, item.carried)
            return
        p = item.pending
        request_id = str(p.index)
        try:
            self.engine.add_request(request_id, item.token_ids, item.params)
        except (ValueError, TypeError) as e:
            self._error_row(p.index, p.id, f"{p.where}: {e}", p.carried)
            return
        self.in_flight[request_id] = p
        self.samples_in_flight += p.n

    def step(self) -> None:
        for output in self.engine.step():
            if output.finished:
                self._finish(output)

    # -- rows --------------------------------------------------------------

    def _finish(self, output) -> None:
        pending = self.in_flight[output.request_id]
        pending.outputs.append(output)
        self.samples_in_flight -= 1
        if len(pending.outputs) < pending.n:
            return
        del self.in_flight[output.request_id]
        outputs = sorted(pending.outputs, key=lambda o: o.sample_index)
        self._add_record([self._result_row(pending, o) for o in outputs])

    def _result_row(self, pending: Pending, output) -> dict:
        t = output.timings
        ok = output.finish_reason != "error"
        row = {
            "index": pending.index, "id": pending.id, "sample_index": output.sample_index,
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
            if ok and pending.wants_logprobs:
                row["openai_logprobs"] = self._openai_logprobs(output.logprobs or [], pending.is_chat)
        if pending.carried:
            row.update(pending.carried)
        if not ok:
            row["error"] = f"{pending.where}: {output.error}"
        return row

    def _openai_logprobs(self, entries: list, chat: bool) -> str:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.engine.tokenizer)
        obj = chat_logprobs(entries, self._token_bytes) if chat else \
            completion_logprobs(entries, self._token_bytes)[0]
        return json.dumps(obj, ensure_ascii=False)

    def _error_row(self, index: int, row_id: str, error: str, carried: Optional[dict] = None) -> None:
        # A record that never became a request: one row, its n unknown or beside the point.
        row: dict[str, Any] = {"index": index, "id": row_id, "sample_index": 0, "output": None,
                               "finish_reason": "error", "error": error, "output_tokens": 0, **(carried or {})}
        self._add_record([row])

    def _add_record(self, rows: list[dict]) -> None:
        # Commits happen between calls, never inside one: a record's rows share a part.
        for row in rows:
            self.writer.add(row)
        self.counters.add_record(rows)
        note_first_error(self.first_errors, rows)

    # -- commits and stopping ------------------------------------------------

    def maybe_commit(self) -> None:
        if commit_due(self.opts, self.writer.pending(), self.last_commit):
            self.commit()

    def commit(self) -> None:
        path = self.writer.commit()
        self.last_commit = time.monotonic()
        if path is not None:
            self.on_commit(os.path.basename(path), self.counters, self.engine.stats())

    def abort_in_flight(self) -> int:
        # Aborted requests are not written (nor their finished samples), so a resume redoes them from scratch.
        n = len(self.in_flight)
        for request_id in list(self.in_flight):
            self.engine.abort_request(request_id)
        self.in_flight.clear()
        self.samples_in_flight = 0
        return n


_END = object()


def note_first_error(first_errors: list[str], rows: list[dict]) -> None:
    """Keep the first error of a record's rows among the job's first five (its n error rows say the same)."""
    failed = next((row for row in rows if row["finish_reason"] == "error"), None)
    if failed is not None and len(first_errors) < 5:
        first_errors.append(f"row {failed['index']}: {failed['error']}")


def commit_due(opts: JobOptions, pending: int, last_commit: float) -> bool:
    """Whether buffered rows are due for a commit: every --commit-every rows or
    --commit-interval-s seconds (``last_commit`` on the monotonic clock), whichever first."""
    return pending >= opts.commit_every or (pending > 0 and time.monotonic() - last_commit >= opts.commit_interval_s)


def drive(rep: Replica, todo: Iterator[Union[Prepared, RowError]], max_in_flight: int,
          between_steps: Callable[[], bool] = lambda: True) -> bool:
    """Admit rows from ``todo`` while fewer than ``max_in_flight`` samples are
    in the engine (a record is admitted whole), and step it, until ``todo``
    runs out and every request finished (returns True) or ``between_steps()``,
    called after each step, returns False (returns False; requests still in
    flight are the caller's)."""
    exhausted = False
    while True:
        while not exhausted and rep.samples_in_flight < max_in_flight:
            item = next(todo, _END)
            if item is _END:
                exhausted = True
                break
            rep.add(item)
        if rep.engine.has_unfinished_requests():
            rep.step()
        elif exhausted:
            return True
        if not between_steps():
            return False


def error_rate_exceeded(opts: JobOptions, c: Counters, taken: int = 0) -> bool:
    """Whether more than --max-error-rate of the records this run has taken in have failed.

    ``taken``: records taken in so far, finished or still in the engine (at least ``c.records``). A row that
    fails validation finishes at once while good rows are still generating, so a rate over finished records
    alone overstates the failures early on (a job with 10% bad rows aborted at "57 of 57 failed"); over the
    records taken in it is a lower bound of the final rate, exact once nothing is in flight."""
    # Over records: a record of n samples that fails counts once, as one that never became a request does.
    limit = opts.max_error_rate
    taken = max(taken, c.records)
    return limit is not None and taken >= opts.error_rate_min_rows and c.failed_records / taken > limit


def describe_engine(engine, input_format: str, already_committed: int) -> dict[str, Any]:
    """What the progress log's "start" event records of an engine (the report's header)."""
    runner = engine.runner
    device = str(getattr(runner, "device", "unknown"))
    return {
        "model": engine.config.model,
        "dtype": str(getattr(runner, "dtype", "unknown")).replace("torch.", ""),
        "quantization": getattr(engine, "quantization", None),  # also when an fp8 checkpoint implied it
        "device": device,
        "device_name": device_name(device),
        "engine_config": engine.config.to_dict(),
        "max_model_len": engine.max_model_len,
        "input_format": input_format,
        "already_committed": already_committed,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # a name is only for the report
            return "cuda"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
