"""Carried columns (``--keep-columns``): input fields copied into the result rows with their Arrow types.

The result schema must be the same in every part, across shards, workers
and resumed runs, so the carried columns and their types are decided once,
before any work, from the input alone (``decide_carried_columns``):

* Parquet and ``datasets.save_to_disk`` inputs: from their schema (the
  files' schemas unified). A named column that is not in it is an error.
* CSV: from the header; every cell is text, so every carried column is a
  string.
* JSON Lines (and files read through ``datasets``): inferred from the first
  ``SAMPLE_ROWS`` records, the same records on every run. A column whose
  values there do not share one Arrow type (or that has no value there) is
  carried as text: strings as they are, other values as JSON. A value of a
  later record that does not fit its column's type makes that row an error
  row naming the column. With ``all``, columns that first appear after the
  sample are not carried.

A carried column whose name is a result column (``index``, ``id``,
``output``, ... ``RESERVED_COLUMNS``) is written as ``input_<name>``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa

from .parquet_writer import RESERVED_COLUMNS
from .readers import input_schema, open_records

SAMPLE_ROWS = 1000
PREFIX = "input_"


@dataclass(frozen=True)
class CarriedColumn:
    source: str  # the input field
    name: str  # the result column
    type: pa.DataType
    as_text: bool = False  # no single type: strings as they are, other values as JSON text
    checked: bool = False  # inferred from a sample: each value is checked against the type

    def describe(self) -> str:
        text = " (as text)" if self.as_text else ""
        renamed = f"{self.source} -> " if self.name != self.source else ""
        return f"{renamed}{self.name}: {self.type}{text}"


@dataclass(frozen=True)
class CarriedColumns:
    """The columns a job carries; empty when ``--keep-columns`` is not given."""

    columns: tuple[CarriedColumn, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.columns)

    @property
    def fields(self) -> list[pa.Field]:
        return [pa.field(c.name, c.type) for c in self.columns]

    def describe(self) -> list[str]:
        """One line per column, for the manifest (a resumed job must carry the same)."""
        return [c.describe() for c in self.columns]

    def values(self, data: Optional[dict]) -> tuple[dict[str, Any], Optional[str]]:
        """(result column -> value, None) for a record's data, or, when a value
        does not fit its column, that column null and a message saying why."""
        if data is None:
            return {c.name: None for c in self.columns}, None
        out: dict[str, Any] = {}
        problem = None
        for c in self.columns:
            value = data.get(c.source)
            if value is None:
                out[c.name] = None
                continue
            if c.as_text:
                value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            elif c.checked:
                why = _misfit(value, c.type)
                if why is not None:
                    if problem is None:
                        problem = (f"keep column {c.source!r}: {_describe(value)} does not fit the column's type "
                                   f"{c.type} (inferred from the input's first {SAMPLE_ROWS} records; {why}); "
                                   "a Parquet input fixes the types")
                    value = None
            out[c.name] = value
        return out, problem


def decide_carried_columns(path: str, fmt: str, keep: Union[list[str], str, None]) -> tuple[CarriedColumns, list[str]]:
    """The carried columns for ``--keep-columns`` (a list of names, "all" or
    None) on this input, and warnings to print. Raises ValueError naming the
    option for a column that cannot be carried."""
    if keep is None:
        return CarriedColumns(), []
    warnings: list[str] = []
    schema = input_schema(path, fmt)
    if schema is not None:
        columns = _from_schema(schema, keep, path)
    else:
        columns, warnings = _from_sample(path, fmt, keep)
    names = [c.name for c in columns]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"keep_columns (--keep-columns): {', '.join(map(repr, clashes))} would be written twice "
                         f"(a carried column named like a result column is written as {PREFIX}<name>); "
                         "name fewer columns")
    return CarriedColumns(tuple(columns)), warnings


def input_field_names(path: str, fmt: str, wanted: Optional[str] = None) -> set[str]:
    """The input's field names: its schema's, else those of its records. Without a schema every record is
    read, unless ``wanted`` is given: then reading stops at the first record that has it (a field name given
    on purpose is found at once; a typo costs one pass over the input, before any work)."""
    schema = input_schema(path, fmt)
    if schema is not None:
        return set(schema.names)
    names: set[str] = set()
    for rec in open_records(path, fmt):
        names.update(rec.data or {})
        if wanted is not None and wanted in names:
            break
    return names


def result_name(source: str) -> str:
    return PREFIX + source if source in RESERVED_COLUMNS else source


def _from_schema(schema: pa.Schema, keep, path: str) -> list[CarriedColumn]:
    names = schema.names if keep == "all" else keep
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise ValueError(f"keep_columns (--keep-columns): {', '.join(map(repr, missing))} not in the input "
                         f"{path} (its columns: {', '.join(schema.names)})")
    return [CarriedColumn(n, result_name(n), _plain_type(schema.field(n).type)) for n in names]


def _from_sample(path: str, fmt: str, keep) -> tuple[list[CarriedColumn], list[str]]:
    values: dict[str, list] = {}
    seen = 0
    for rec in open_records(path, fmt):
        if seen >= SAMPLE_ROWS:
            break
        seen += 1
        for name, value in (rec.data or {}).items():
            column = values.setdefault(name, [])
            if value is not None:
                column.append(value)
    whole = seen < SAMPLE_ROWS  # the sample was the whole input
    names = list(values) if keep == "all" else keep
    absent = [n for n in names if n not in values]
    warnings = []
    if absent and whole:
        raise ValueError(f"keep_columns (--keep-columns): {', '.join(map(repr, absent))} in no record of "
                         f"{path} (fields seen: {', '.join(values) or 'none'})")
    if absent:
        warnings.append(f"--keep-columns: {', '.join(map(repr, absent))} in none of the first {SAMPLE_ROWS} records "
                        f"of {path}; carried as text (null where absent)")
    return [_inferred(n, values.get(n, [])) for n in names], warnings


def _inferred(name: str, values: list) -> CarriedColumn:
    try:
        typ = pa.array(values).type if values else None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        typ = None
    if typ is not None and any(_bool_in_number(v, typ) for v in values):
        typ = None  # booleans beside numbers: pyarrow would make true 1.0; as text each keeps its own value
    if typ is None or _has_null_type(typ):
        return CarriedColumn(name, result_name(name), pa.string(), as_text=True)
    return CarriedColumn(name, result_name(name), typ, checked=True)


def _plain_type(t: pa.DataType) -> pa.DataType:
    # A dictionary-encoded column (pandas categoricals) is carried as its values.
    return t.value_type if pa.types.is_dictionary(t) else t


def _has_null_type(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    return any(_has_null_type(t.field(i).type) for i in range(t.num_fields))


def _bool_in_number(value: Any, t: pa.DataType) -> bool:
    """Whether ``value`` has a boolean where ``t`` has a number (pyarrow converts it, true to 1)."""
    if isinstance(value, bool):
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if isinstance(value, dict) and pa.types.is_struct(t):
        return any(_bool_in_number(value.get(t.field(i).name), t.field(i).type) for i in range(t.num_fields))
    if isinstance(value, list) and (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return any(_bool_in_number(v, t.value_type) for v in value)
    return False


def _misfit(value: Any, t: pa.DataType) -> Optional[str]:
    if isinstance(value, float) and pa.types.is_integer(t) and not value.is_integer():
        return "a fraction in an integer column"
    if _bool_in_number(value, t):
        return "a boolean in a numeric column"
    try:
        pa.array([value], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


__all__ = ["CarriedColumn", "CarriedColumns", "decide_carried_columns", "result_name", "SAMPLE_ROWS", "PREFIX"]
