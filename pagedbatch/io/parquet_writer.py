"""Crash-safe results: a directory of immutable Parquet part files.

A part is written under a dot-prefixed temporary name in the results
directory, fsynced, then renamed into place (and the directory fsynced), so a
``part-*.parquet`` file is either complete or absent whatever moment the job is
killed at. A Parquet file cut off before its footer cannot be read at all, and
one such file would break ``pyarrow.dataset`` over the directory; the only
debris a kill can leave is a ``.tmp-*`` file, which readers skip and
``cleanup_temp_files`` removes. Resuming = skipping ``committed_indices``.

A record asked for n samples has n rows (``sample_index`` 0..n-1), and its
writers add them between two commits, so they share one part: a committed
index is a complete record.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import time
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

_TMP_PREFIX = ".tmp-"
_PART_RE = re.compile(r"^part-(\d{5})-(.+)-(\d{6})\.parquet$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_BASE_FIELDS = [
    pa.field("index", pa.int64(), nullable=False),
    pa.field("id", pa.string()),
    pa.field("sample_index", pa.int64()),  # which of the record's n samples (0 with n=1)
    pa.field("output", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("queue_s", pa.float64()),
    pa.field("ttft_s", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("tpot_s", pa.float64()),
    pa.field("num_preemptions", pa.int64()),
    pa.field("shard", pa.int64()),
]

# Every column a result row can have, whatever the options: carried input
# columns with these names are renamed (io/carried.py).
RESERVED_COLUMNS = frozenset([f.name for f in _BASE_FIELDS] + [
    "prompt", "prompt_token_ids", "output_token_ids", "logprobs", "is_chat", "openai_logprobs"])


def result_schema(include_prompt: bool = False, include_token_ids: bool = False, include_logprobs: bool = False) -> pa.Schema:
    """The schema of result parts. ``output`` is null on error rows;
    ``logprobs`` is the chosen token's log-probability per output token."""
    fields = list(_BASE_FIELDS)
    if include_prompt:
        fields.append(pa.field("prompt", pa.string()))
    if include_token_ids:
        fields.append(pa.field("prompt_token_ids", pa.list_(pa.int64())))
        fields.append(pa.field("output_token_ids", pa.list_(pa.int64())))
    if include_logprobs:
        fields.append(pa.field("logprobs", pa.list_(pa.float64())))
    return pa.schema(fields)


class DiskFull(OSError):
    """A part could not be written because the disk (or the quota) holding the
    output directory is full. Nothing half-written is left; committed parts are intact."""

    @classmethod
    def committing(cls, out: str, rows: int, cause: OSError) -> "DiskFull":
        return cls(cause.errno, (
            f"the disk holding the output directory {out} is full ({cause.strerror or cause}): {rows} finished "
            f"rows could not be committed and will be redone. Every committed row is intact. Free some space "
            f"on that disk, then rerun the same command to resume"))

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class PartWriter:
    """Buffers result rows and commits them as one new part file per ``commit``.

    Part names are ``part-{shard:05d}-{run_id}-{seq:06d}.parquet``; a writer
    reopened with the same shard and run id continues the sequence instead of
    overwriting committed parts.
    """

    def __init__(self, results_dir: str, schema: pa.Schema, *, shard_index: int, run_id: str):
        if not isinstance(shard_index, int) or not 0 <= shard_index < 100_000:
            raise ValueError(f"shard_index must be an integer in [0, 99999], got {shard_index!r}")
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id must be letters, digits, '_', '.' or '-' (not starting with '.'), got {run_id!r}")
        missing = [name for name in ("index", "id") if name not in schema.names]
        if missing:
            raise ValueError(f"result schema lacks the column(s) {missing}")
        self.results_dir = results_dir
        self.schema = schema
        self.shard_index = shard_index
        self.run_id = run_id
        self._rows: list[dict] = []
        self._columns = frozenset(schema.names)
        os.makedirs(results_dir, exist_ok=True)
        prefix = f"part-{shard_index:05d}-{run_id}-"
        seqs = [int(m.group(3)) for m in map(_PART_RE.match, os.listdir(results_dir))
                if m and m.group(0).startswith(prefix) and m.group(2) == run_id]
        self._seq = max(seqs, default=-1) + 1

    def add(self, row: dict) -> None:
        """Buffer one result row (columns left out are null; ``shard``
        defaults to this writer's shard). Unknown columns raise ValueError."""
        unknown = row.keys() - self._columns
        if unknown:
            raise ValueError(f"result row has column(s) {sorted(unknown)} that are not in the result schema "
                             f"({', '.join(self.schema.names)})")
        if "shard" in self._columns and row.get("shard") is None:
            row = {**row, "shard": self.shard_index}
        self._rows.append(row)

    def pending(self) -> int:
        """How many rows are buffered and not yet committed."""
        return len(self._rows)

    def commit(self) -> Optional[str]:
        """Write the buffered rows as one new part file, atomically and durably;
        returns its path, or None when nothing was buffered. On failure the
        rows stay buffered and no part appears; a full disk raises DiskFull,
        naming the directory above ``results_dir`` (the job's OUT)."""
        if not self._rows:
            return None
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        name = f"part-{self.shard_index:05d}-{self.run_id}-{self._seq:06d}.parquet"
        path = os.path.join(self.results_dir, name)

        def write(f) -> None:
            pq.write_table(table, f, compression="zstd")

        try:
            _atomic_write(path, write)
        except OSError as e:
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise DiskFull.committing(os.path.dirname(os.path.abspath(self.results_dir)), len(self._rows), e) from e
            raise
        self._rows = []
        self._seq += 1
        return path


def committed_indices(results_dir: str) -> set[int]:
    """The ``index`` of every row in a committed part (only that column is
    read). An absent directory has none."""
    done: set[int] = set()
    for path in _part_files(results_dir):
        done.update(_read_index_column(path).to_pylist())
    return done


def cleanup_temp_files(results_dir: str, *, shard_index: Optional[int] = None) -> int:
    """Remove the ``.tmp-*`` files that killed runs left behind; returns how
    many. With writers of several shards sharing the directory at once, give
    ``shard_index`` so that only that shard's temporaries are touched."""
    if not os.path.isdir(results_dir):
        return 0
    prefix = _TMP_PREFIX if shard_index is None else f"{_TMP_PREFIX}part-{shard_index:05d}-"
    removed = 0
    for name in os.listdir(results_dir):
        if name.startswith(prefix):
            try:
                os.remove(os.path.join(results_dir, name))
                removed += 1
            except FileNotFoundError:
                pass  # another process cleaned it up first
    return removed


def read_results(results_dir: str) -> pa.Table:
    """All committed result rows as one table sorted by ``index`` and
    ``sample_index``. Parts with different optional columns are unified
    (missing values null)."""
    import pyarrow.dataset as ds

    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    files = _part_files(results_dir)
    if not files:
        return result_schema().empty_table()
    schemas = [read_part_schema(path) for path in files]
    # The explicit file list keeps temporaries and other files out of the dataset.
    table = ds.dataset(files, schema=pa.unify_schemas(schemas), format="parquet").to_table()
    keys = [("index", "ascending")]
    if "sample_index" in table.column_names:  # parts written before n samples lack it
        keys.append(("sample_index", "ascending"))
    return table.sort_by(keys)


def check_exactly_once(results_dir: str, expected_indices: Iterable[int]) -> tuple[list[int], list[int]]:
    """``(missing, duplicated)``: expected indices with no committed row, and
    indices with some (index, sample_index) in more than one row, both sorted."""
    counts: Counter = Counter()
    for path in _part_files(results_dir):
        columns = ["index", "sample_index"] if "sample_index" in pq.read_schema(path).names else ["index"]
        table = pq.read_table(path, columns=columns)
        samples = table.column("sample_index").to_pylist() if "sample_index" in columns else [0] * table.num_rows
        counts.update(zip(table.column("index").to_pylist(), samples))
    indices = {i for i, _ in counts}
    missing = sorted(i for i in set(expected_indices) if i not in indices)
    duplicated = sorted({i for (i, _), n in counts.items() if n > 1})
    return missing, duplicated


def write_openai_batch_output(results_dir: str, out_path: str, ids_are_custom: bool = True, *,
                              model: str = "pagedbatch") -> None:
    """Write the results as an OpenAI batch output file (JSON Lines, one line
    per record in index order), atomically. ``custom_id`` is the row's id when
    ``ids_are_custom``, else its index. Rows with an ``is_chat`` column set
    true get a chat completion object, the others a text completion. A
    record's n samples are the n ``choices`` of its one line (``index`` =
    ``sample_index``); a record with an error row is an error line."""
    table = read_results(results_dir)
    created = int(time.time())

    def write(f) -> None:
        for line in _openai_lines(table, ids_are_custom, model, created):
            f.write(line)

    _atomic_write(out_path, write)


def _openai_lines(table: pa.Table, ids_are_custom: bool, model: str, created: int) -> Iterator[bytes]:
    rows = (row for batch in table.to_batches(max_chunksize=4096) for row in batch.to_pylist())
    for index, group in itertools.groupby(rows, key=lambda row: row["index"]):
        samples = list(group)  # sorted by sample_index (read_results)
        first = samples[0]
        custom_id = first.get("id") if ids_are_custom and first.get("id") is not None else str(index)
        line = {"id": f"batch_req_{index}", "custom_id": custom_id, "response": None, "error": None}
        failed = next((row for row in samples if row.get("error") is not None), None)
        if failed is not None:
            line["error"] = {"code": "invalid_request", "message": failed["error"]}
        else:
            line["response"] = {"status_code": 200, "request_id": f"req_{index}",
                                "body": _completion(samples, index, model, created)}
        yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def _completion(samples: list[dict], index: int, model: str, created: int) -> dict:
    # The prompt is counted once however many samples it has (as OpenAI counts n).
    prompt_tokens = samples[0].get("prompt_tokens") or 0
    completion_tokens = sum(row.get("output_tokens") or 0 for row in samples)
    chat = bool(samples[0].get("is_chat"))
    choices = []
    for j, row in enumerate(samples):
        text = row.get("output") or ""
        sample = row.get("sample_index")
        choice: dict[str, Any] = {"index": j if sample is None else sample}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = row.get("finish_reason")
        logprobs = row.get("openai_logprobs")
        choice["logprobs"] = json.loads(logprobs) if logprobs else None
        choices.append(choice)
    return {
        "id": f"cmpl-{index}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


# --- helpers ----------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, _TMP_PREFIX + os.path.basename(path))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _part_files(results_dir: str) -> list[str]:
    if not os.path.isdir(results_dir):
        return []
    return [os.path.join(results_dir, n) for n in sorted(os.listdir(results_dir)) if _PART_RE.match(n)]


def read_part_schema(path: str) -> pa.Schema:
    """A committed part's schema; ValueError naming the part and what to do where it is damaged."""
    try:
        return pq.read_schema(path)
    except Exception as e:
        raise _corrupt(path, e) from e


def _read_index_column(path: str) -> pa.ChunkedArray:
    try:
        return pq.read_table(path, columns=["index"]).column(0)
    except Exception as e:
        raise _corrupt(path, e) from e


def _corrupt(path: str, cause: Exception) -> ValueError:
    # Our writer never leaves a partial part under its final name, so this is
    # outside damage: refuse loudly rather than silently redo or drop rows.
    return ValueError(f"result part {path} is unreadable ({cause}); it was not written by an interrupted "
                      "PartWriter (those leave only .tmp-* files). Move it out of the results directory "
                      "to redo its rows, or restore it.")


__all__ = [
    "RESERVED_COLUMNS", "DiskFull", "is_disk_full", "result_schema", "PartWriter", "committed_indices",
    "cleanup_temp_files", "read_results", "check_exactly_once", "write_openai_batch_output", "read_part_schema",
]
