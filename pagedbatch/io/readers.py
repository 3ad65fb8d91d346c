"""Streaming input readers: one ``InputRecord`` per row, memory bounded.

Every reader works in batches or line by line, so a 100 GB input costs the
same memory as a 100 KB one (a JSON *array* read through ``datasets`` is the
exception: it must be parsed whole; prefer JSON Lines for big inputs).
Rows that cannot be parsed are not dropped: they come out as records with
``data=None`` and an ``error``, keeping their position, so that the job can
report them and indices stay stable when a bad row is fixed and the job rerun.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

FORMATS = ("jsonl", "parquet", "csv", "hf-disk", "hf", "openai")

_JSONL_EXTS = (".jsonl", ".ndjson", ".json")
# Builders of `datasets.load_dataset` for the "hf" format, by file extension.
_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".arrow": "arrow",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class InputRecord:
    """One input row. ``index`` is its 0-based position among the input's
    records; ``data`` is None exactly when ``error`` says why it could not be
    parsed."""

    index: int
    data: Optional[dict]
    error: Optional[str]


def detect_format(path: str, override: Optional[str] = None) -> str:
    """The input format of ``path`` (one of ``FORMATS``), or ``override`` once
    checked. Raises FileNotFoundError for a missing path and ValueError, naming
    the path, for one that is of no known format or cannot be read."""
    if override is not None:
        if override not in FORMATS:
            raise ValueError(f"unknown input format {override!r} for {path}; expected one of {', '.join(FORMATS)}")
        return override
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json")):
            return "hf-disk"
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "hf-disk"
        if _parquet_files(path):
            return "parquet"
        raise ValueError(
            f"cannot tell the input format of directory {path}: it holds no .parquet files and is not a "
            "datasets.save_to_disk directory (no dataset_info.json / state.json); pass the format explicitly"
        )
    ext = _extension(path)
    if ext == ".parquet":
        return "parquet"
    if ext == ".csv":
        return "csv"
    if ext in _JSONL_EXTS:
        first = _first_nonblank_line(path)
        if first is None:
            return "jsonl"  # an empty file: zero records, not an error
        try:
            value = json.loads(first)
        except ValueError:
            # A .json file whose first line is not a whole JSON value is a
            # multi-line JSON document (an array, a pretty-printed object);
            # a malformed .jsonl line is reported per record instead.
            if ext == ".json" and first.lstrip()[:1] in (b"[", b"{"):
                return "hf"
            return "jsonl"
        if isinstance(value, dict):
            return "openai" if _looks_like_openai_request(value) else "jsonl"
        if ext == ".json" and isinstance(value, list):
            return "hf"
        return "jsonl"
    if ext in _HF_BUILDERS:
        return "hf"
    raise ValueError(
        f"cannot tell the input format of {path} from its extension {ext or '(none)'!r}; supported: "
        ".jsonl/.json (JSON Lines or OpenAI batch), .parquet, .csv, .arrow, .txt, or a directory; "
        f"or pass the format explicitly (one of {', '.join(FORMATS)})"
    )


def open_records(path: str, fmt: Optional[str] = None, *, batch_rows: int = 1024) -> Iterator[InputRecord]:
    """Iterate over the records of ``path`` in input order, reading at most
    about ``batch_rows`` rows at a time.

    The path is checked and opened before this returns, so a missing or
    unreadable input raises FileNotFoundError / ValueError here rather than at
    the first ``next()``.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    fmt = detect_format(path, fmt)
    if fmt in ("jsonl", "openai"):
        return _jsonl_records(_open_binary(path))
    if fmt == "parquet":
        return _parquet_records(path, batch_rows)
    if fmt == "csv":
        return _csv_records(path, batch_rows)
    if fmt == "hf-disk":
        return _hf_disk_records(path, batch_rows)
    return _hf_records(path)


def input_schema(path: str, fmt: str):
    """The Arrow schema of an input whose columns are known without reading its
    rows (Parquet: the files' schemas unified; a datasets.save_to_disk folder:
    its features; CSV: the header, every column a string), else None (JSON
    Lines, OpenAI batch files and files read through ``datasets``). Raises
    ValueError when the Parquet files' schemas conflict."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        schemas = [pq.read_schema(f) for f in parquet_files(path)]
        try:
            return pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"the Parquet files of {path} have conflicting schemas: {e}") from None
    if fmt == "hf-disk":
        return _load_hf_disk(path).features.arrow_schema
    if fmt == "csv":
        import pyarrow.csv as pacsv

        probe = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip")
        try:
            names = pacsv.open_csv(path, parse_options=probe).schema.names
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read CSV file {path}: {e}") from e
        _refuse_duplicate_names(names, path)
        return pa.schema([(name, pa.string()) for name in names])
    return None


def file_records(path: str, fmt: str, opener: Callable[[], Any], *, batch_rows: int = 1024) -> Iterator[InputRecord]:
    """The records of one file of a jsonl, openai, parquet or csv input,
    numbered from 0 within the file, read from the random-access files that
    ``opener()`` returns (``path`` only names it in messages). For callers
    that open files through their own filesystem layer (Ray Data's read
    tasks); records, bad rows and their positions are those ``open_records``
    gives for a single file."""
    if fmt in ("jsonl", "openai"):
        return _jsonl_records(io.BufferedReader(_RawReader(opener())))
    if fmt == "parquet":
        return _parquet_iter([opener()], batch_rows)
    if fmt == "csv":
        return _csv_records(path, batch_rows, opener)
    raise ValueError(f"file_records reads jsonl, openai, parquet and csv files, not {fmt!r}")


class _RawReader(io.RawIOBase):
    """Line iteration over a file object that has ``read(n)`` only (pyarrow's files)."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


# --- JSON Lines -------------------------------------------------------------


def _jsonl_records(f) -> Iterator[InputRecord]:
    # Binary line iteration keeps memory flat whatever the file size and, unlike
    # pyarrow.json, copes with fields that first appear late in the file.
    index = 0
    try:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM):]
            if not line.strip():
                continue
            yield _parse_json_line(index, lineno, line)
            index += 1
    finally:
        f.close()


def _parse_json_line(index: int, lineno: int, line: bytes) -> InputRecord:
    try:
        value = json.loads(line)
    except UnicodeDecodeError as e:
        return InputRecord(index, None, f"line {lineno}: not valid UTF-8: {e}")
    except ValueError as e:
        if not line.endswith(b"\n"):
            msg = f"line {lineno}: malformed JSON in the last line, which has no trailing newline (cut off while being written?): {e}"
        else:
            msg = f"line {lineno}: malformed JSON: {e}"
        return InputRecord(index, None, msg)
    if not isinstance(value, dict):
        return InputRecord(index, None, f"line {lineno}: expected a JSON object, got {_json_type(value)}")
    return InputRecord(index, value, None)


# --- Parquet ----------------------------------------------------------------


def _parquet_records(path: str, batch_rows: int) -> Iterator[InputRecord]:
    import pyarrow.parquet as pq

    files = [path] if os.path.isfile(path) else _parquet_files(path)
    if not files:
        raise ValueError(f"no .parquet files under {path}")
    # Read every footer now: a truncated file (a writer killed before close())
    # has none, and is better reported before the job starts than halfway.
    for file in files:
        try:
            names = pq.read_schema(file).names
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError
            raise ValueError(f"cannot read Parquet file {file}: {e}") from e
        _refuse_duplicate_names(names, file, "Parquet file")
    return _parquet_iter(files, batch_rows)


def _parquet_iter(files: list[str], batch_rows: int) -> Iterator[InputRecord]:
    import pyarrow.parquet as pq

    index = 0
    for file in files:
        with pq.ParquetFile(file) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows):
                for row in batch.to_pylist():
                    yield InputRecord(index, row, None)
                    index += 1


def parquet_files(path: str) -> list[str]:
    """The data files of a Parquet input (a file, or a folder's files in the order their rows are numbered)."""
    return [path] if os.path.isfile(path) else _parquet_files(path)


def _parquet_files(directory: str) -> list[str]:
    # Files in sorted path order (nested folders too), so indices are stable
    # across runs; dot- and underscore-files (_SUCCESS, temporaries) are not data.
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in sorted(names):
            if name.endswith(".parquet") and not name.startswith((".", "_")):
                found.append(os.path.join(root, name))
    return found


# --- CSV --------------------------------------------------------------------


def _csv_records(path: str, batch_rows: int, opener: Optional[Callable[[], Any]] = None) -> Iterator[InputRecord]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # A fixed block size keeps memory bounded; batch_rows is only a hint here
    # (about 1 KB per row), since pyarrow's CSV reader batches by bytes.
    block_size = min(max(batch_rows * 1024, 1 << 20), 64 << 20)
    read_options = pacsv.ReadOptions(block_size=block_size, use_threads=False)
    invalid: list[tuple[Optional[int], str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, f"CSV row {row.number if row.number is not None else '?'}: expected "
                        f"{row.expected_columns} columns, got {row.actual_columns}: {row.text[:200]!r}"))
        return "skip"

    parse_options = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid)
    try:
        # Every column as a string: type inference from the first block breaks
        # on a later block that disagrees; parse_record decodes the values.
        # The probe, only for the column names, gets its own (ignoring) handler.
        probe_parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip")
        source = opener or (lambda: path)  # the file is opened twice: once for the column names
        names = pacsv.open_csv(source(), read_options=read_options, parse_options=probe_parse).schema.names
        _refuse_duplicate_names(names, path)
        convert_options = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            null_values=[""],  # not pyarrow's default list, which would turn a prompt "NA" into null
            strings_can_be_null=True,
        )
        reader = pacsv.open_csv(source(), read_options=read_options, parse_options=parse_options,
                                convert_options=convert_options)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read CSV file {path}: {e}") from e
    return _csv_iter(path, reader, invalid)


def _refuse_duplicate_names(names: list[str], path: str, what: str = "CSV file") -> None:
    """Columns named twice: each record would keep one of the two values, silently."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if name in seen:
            raise ValueError(f"{what} {path} names the column {name!r} twice (columns {seen[name]} and {i}); "
                             "rename one")
        seen[name] = i


def _csv_iter(path: str, reader, invalid: list) -> Iterator[InputRecord]:
    import pyarrow as pa

    # The reader reports a row with the wrong number of columns through the
    # callback (with its row number, header = 1) while parsing ahead, so those
    # rows are merged back at their own position among the good ones.
    index = 0

    def drain(upto: Optional[int]) -> Iterator[InputRecord]:
        nonlocal index
        invalid.sort(key=lambda item: -1 if item[0] is None else item[0])
        while invalid and (upto is None or invalid[0][0] is None or invalid[0][0] - 2 <= index):
            _, msg = invalid.pop(0)
            yield InputRecord(index, None, msg)
            index += 1

    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            for row in batch.to_pylist():
                yield from drain(index)
                yield InputRecord(index, row, None)
                index += 1
            yield from drain(index)
    except pa.ArrowInvalid as e:
        raise ValueError(f"cannot read CSV file {path} after record {index}: {e}") from e
    yield from drain(None)


# --- Hugging Face datasets --------------------------------------------------


def _hf_disk_records(path: str, batch_rows: int) -> Iterator[InputRecord]:
    return _hf_disk_iter(_load_hf_disk(path).with_format(None), batch_rows)


def _load_hf_disk(path: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise ValueError(f"cannot load the datasets.save_to_disk directory {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise ValueError(
                f"{path} is a DatasetDict with splits {splits}; point the input at one split's directory "
                f"(e.g. {os.path.join(path, splits[0]) if splits else path})"
            )
        ds = ds[splits[0]]
    return ds


def _hf_disk_iter(ds, batch_rows: int) -> Iterator[InputRecord]:
    # The dataset is memory-mapped Arrow; iterating in batches of plain Python
    # values touches only the pages of the current batch.
    index = 0
    for batch in ds.iter(batch_size=batch_rows):
        names = list(batch.keys())
        for values in zip(*batch.values()):
            yield InputRecord(index, dict(zip(names, values)), None)
            index += 1


def _hf_records(path: str) -> Iterator[InputRecord]:
    import datasets

    ext = _extension(path)
    builder = _HF_BUILDERS.get(ext)
    if builder is None:
        raise ValueError(
            f"no datasets builder for {path} (extension {ext or '(none)'!r}); "
            f"supported: {', '.join(sorted(_HF_BUILDERS))}"
        )
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
        rows = iter(ds)
        # A streaming dataset reads nothing until iterated: take the first row
        # now so that an unreadable file fails before the job starts.
        first = next(rows, None)
    except Exception as e:
        raise ValueError(f"cannot read {path} with datasets.load_dataset({builder!r}, streaming=True): {e}") from e
    return _hf_iter(first, rows)


def _hf_iter(first: Optional[dict], rows: Iterator[dict]) -> Iterator[InputRecord]:
    if first is None:
        return
    yield InputRecord(0, dict(first), None)
    for index, row in enumerate(rows, start=1):
        yield InputRecord(index, dict(row), None)


# --- helpers ----------------------------------------------------------------


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except IsADirectoryError as e:
        raise ValueError(f"cannot read {path} as JSON Lines: it is a directory") from e
    except OSError as e:
        raise ValueError(f"cannot open {path}: {e}") from e


def _first_nonblank_line(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1 and line.startswith(_UTF8_BOM):
                    line = line[len(_UTF8_BOM):]
                if line.strip():
                    return line
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return None


def _looks_like_openai_request(value: dict) -> bool:
    return "custom_id" in value and isinstance(value.get("body"), dict)


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


_JSON_TYPES: dict[type, str] = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


__all__ = ["FORMATS", "InputRecord", "detect_format", "open_records", "file_records", "parquet_files", "input_schema"]
