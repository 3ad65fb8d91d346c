"""Progress: what a person watches (a tqdm bar or periodic log lines) and
what the report reads later (OUT/progress-SSSSS.jsonl, one event per commit).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TextIO


@dataclass
class Counters:
    """This run's totals (written by this process). A record gives one row,
    or one per sample with n > 1: ``records`` and ``failed_records`` count
    records (what --max-error-rate and the progress display use), ``rows``
    and ``errors`` the result rows; ``prompt_tokens`` counts a record's
    prompt once (its samples share it)."""

    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    records: int = 0
    failed_records: int = 0

    def add_record(self, rows: list[dict]) -> None:
        """Count one record's result rows (all of them, written together)."""
        self.records += 1
        if rows[0].get("finish_reason") != "error":  # a refused prompt is no token served (as in the report)
            self.prompt_tokens += rows[0].get("prompt_tokens") or 0
        failed = False
        for row in rows:
            self.rows += 1
            if row.get("finish_reason") == "error":
                self.errors += 1
                failed = True
            self.output_tokens += row.get("output_tokens") or 0
        self.failed_records += failed

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "records": self.records, "failed_records": self.failed_records}

    def describe_errors(self) -> str:
        """"3 errors", or "12 error rows in 3 records" when records have several samples."""
        if self.rows == self.records:
            return f"{self.errors} errors"
        return f"{self.errors} error rows in {self.failed_records} records"

    def describe_rows(self) -> str:
        """"12 rows", or "48 rows (12 records)" when records have several samples."""
        text = f"{self.rows} rows"
        return text if self.rows == self.records else f"{text} ({self.records} records)"


class ProgressLog:
    """Appends one JSON line per event to OUT/progress-{shard:05d}.jsonl.

    Events: "start" (model, device, engine config), "commit" (counters and
    engine statistics after each committed part), "end" (how the run ended).
    A line cut off by a kill is skipped on reading.
    """

    def __init__(self, out: str, shard_index: int, run_id: str):
        self.path = os.path.join(out, f"progress-{shard_index:05d}.jsonl")
        self.shard_index = shard_index
        self.run_id = run_id
        # A line cut off by a kill or a full disk must not swallow the next event.
        self._cut = _ends_mid_line(self.path)

    def write(self, event: str, **fields: Any) -> None:
        line = {"event": event, "t": time.time(), "shard": self.shard_index, "run_id": self.run_id, **fields}
        text = ("\n" if self._cut else "") + json.dumps(line, default=str) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
        except OSError:
            self._cut = True  # part of the line may be there
            raise
        self._cut = False


def _ends_mid_line(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_progress(out: str) -> list[dict[str, Any]]:
    """Every event of every shard's progress log, in time order."""
    events = []
    if not os.path.isdir(out):
        return events
    for name in sorted(os.listdir(out)):
        if name.startswith("progress-") and name.endswith(".jsonl"):
            events.extend(_read_lines(os.path.join(out, name)))
    events.sort(key=lambda e: e.get("t", 0.0))
    return events


def _read_lines(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                value = json.loads(line)
            except ValueError:
                continue  # the half-written last line of a killed run
            if isinstance(value, dict):
                yield value


class ProgressDisplay:
    """A tqdm bar on a terminal; a plain line every ``interval_s`` otherwise
    (Slurm logs, cron mail); nothing when quiet."""

    def __init__(self, quiet: bool, interval_s: float, total: Optional[int], already_done: int,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.interval_s = interval_s
        self.total = total
        self.already_done = already_done
        self.start = time.perf_counter()
        self._last_log = self.start
        self._bar = None
        if not quiet and _is_tty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=already_done, unit="record", desc="records", file=self.stream,
                             dynamic_ncols=True)
        self._shown = 0

    def update(self, c: Counters) -> None:
        if self.quiet:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(c.records - self._shown)
            self._shown = c.records
            self._bar.set_postfix(out_tok_s=f"{c.output_tokens / elapsed:.1f}", errors=c.failed_records, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            self.log_line(c)

    def log_line(self, c: Counters) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        # Committed and total counts are records (input indices); with n samples a record has n rows.
        done = self.already_done + c.records
        of = f"/{self.total}" if self.total is not None else ""
        unit, rows = ("rows", "") if c.rows == c.records else ("records", f", {c.rows} rows")
        print(f"[pagedbatch] {unit} {done}{of} ({c.records} this run{rows}), errors {c.failed_records}, "
              f"{c.records / elapsed:.2f} {unit}/s, {c.output_tokens / elapsed:.1f} output tok/s, "
              f"elapsed {elapsed:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
