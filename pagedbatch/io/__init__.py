"""Job input and output: streaming readers, request parsing, crash-safe Parquet results."""
from .parquet_writer import (
    RESERVED_COLUMNS,
    DiskFull,
    PartWriter,
    check_exactly_once,
    cleanup_temp_files,
    committed_indices,
    is_disk_full,
    read_results,
    result_schema,
    write_openai_batch_output,
)
from .readers import FORMATS, InputRecord, detect_format, file_records, input_schema, open_records, parquet_files
from .requests import SAMPLING_FIELDS, FieldNames, ParsedRequest, RowError, parse_record

__all__ = [
    "FORMATS", "InputRecord", "detect_format", "open_records", "file_records", "parquet_files", "input_schema",
    "SAMPLING_FIELDS", "FieldNames", "ParsedRequest", "RowError", "parse_record",
    "result_schema", "PartWriter", "committed_indices", "cleanup_temp_files", "read_results",
    "check_exactly_once", "write_openai_batch_output", "RESERVED_COLUMNS", "DiskFull", "is_disk_full",
]
