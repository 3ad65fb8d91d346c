"""Streaming readers: every format, right records and indices, errors kept in place."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from pagedbatch.io import FORMATS, InputRecord, detect_format, open_records  # noqa: E402

ROWS = [
    {"id": "a", "prompt": "Hello", "max_tokens": 5},
    {"id": "b", "prompt": "World", "max_tokens": 7},
    {"id": "c", "prompt": "Third", "max_tokens": 9},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_of(records):
    return [r.data for r in records]


def test_formats_are_the_documented_ones():
    assert FORMATS == ("jsonl", "parquet", "csv", "hf-disk", "hf", "openai")


def test_jsonl_yields_rows_with_indices(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert detect_format(path) == "jsonl"
    records = list(open_records(path))
    assert [r.index for r in records] == [0, 1, 2]
    assert data_of(records) == ROWS
    assert all(r.error is None for r in records)


def test_jsonl_blank_lines_are_not_records(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n   \n{"prompt": "b"}\n\n')
    records = list(open_records(str(path)))
    assert [(r.index, r.data) for r in records] == [(0, {"prompt": "a"}), (1, {"prompt": "b"})]


def test_jsonl_malformed_line_keeps_its_index_and_carries_an_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b" "oops"}\n{"prompt": "c"}\n')
    records = list(open_records(str(path)))
    assert [r.index for r in records] == [0, 1, 2]
    bad = records[1]
    assert bad.data is None
    assert bad.error.startswith("line 3: malformed JSON: Expecting ','")
    assert records[2].data == {"prompt": "c"}


def test_jsonl_non_object_value_is_an_error_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2, 3]\n"just a string"\n')
    records = list(open_records(str(path)))
    assert records[1].data is None and "line 2: expected a JSON object, got array" in records[1].error
    assert records[2].data is None and "got string" in records[2].error


def test_jsonl_half_written_last_line_is_an_error_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "hal')
    records = list(open_records(str(path)))
    assert len(records) == 3 and records[2].index == 2 and records[2].data is None
    assert "line 3" in records[2].error and "no trailing newline" in records[2].error


def test_jsonl_complete_last_line_without_newline_is_fine(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}')
    assert data_of(open_records(str(path))) == [{"prompt": "a"}, {"prompt": "b"}]


def test_jsonl_invalid_utf8_is_an_error_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    records = list(open_records(str(path)))
    assert records[1].data is None and "line 2" in records[1].error


def test_jsonl_fields_appearing_late_are_kept(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(3000)]
    rows.append({"prompt": "late", "temperature": 0.5, "stop": ["\n"]})
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    records = list(open_records(path, batch_rows=100))
    assert len(records) == 3001 and records[-1].index == 3000
    assert records[-1].data == {"prompt": "late", "temperature": 0.5, "stop": ["\n"]}


def test_jsonl_with_utf8_bom(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert data_of(open_records(str(path))) == [{"prompt": "a"}]


def test_empty_jsonl_has_no_records(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("")
    assert detect_format(str(path)) == "jsonl"
    assert list(open_records(str(path))) == []


def test_openai_batch_file_is_detected_and_read(tmp_path):
    rows = [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 3}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}]}},
    ]
    path = write_jsonl(tmp_path / "batch.jsonl", rows)
    assert detect_format(path) == "openai"
    records = list(open_records(path))
    assert [r.index for r in records] == [0, 1] and data_of(records) == rows


def test_parquet_file_streams_in_batches(tmp_path):
    rows = [{"id": i, "prompt": f"p{i}", "temperature": None if i % 3 else 0.5} for i in range(2500)]
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    assert detect_format(path) == "parquet"
    records = list(open_records(path, batch_rows=128))
    assert [r.index for r in records] == list(range(2500))
    assert data_of(records) == rows


def test_parquet_directory_reads_files_in_sorted_order(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "c"}, {"prompt": "d"}]), str(d / "part-1.parquet"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "b"}]), str(d / "part-0.parquet"))
    (d / "_SUCCESS").write_text("")
    (d / ".part-2.parquet.tmp").write_text("half written")
    assert detect_format(str(d)) == "parquet"
    records = list(open_records(str(d)))
    assert [(r.index, r.data["prompt"]) for r in records] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]


def test_truncated_parquet_in_directory_fails_before_yielding(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}]), str(d / "a.parquet"))
    good = (d / "a.parquet").read_bytes()
    (d / "b.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="b.parquet"):
        open_records(str(d))


def test_csv_columns_are_strings_and_missing_cells_none(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(
        'id,prompt,max_tokens,stop\n'
        '1,"Hello, world",5,\n'
        '2,"multi\nline prompt",,"[""\\n"", ""END""]"\n'
        '3,NA,007,x\n'
    )
    assert detect_format(str(path)) == "csv"
    records = list(open_records(str(path)))
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].data == {"id": "1", "prompt": "Hello, world", "max_tokens": "5", "stop": None}
    assert records[1].data == {"id": "2", "prompt": "multi\nline prompt", "max_tokens": None, "stop": '["\\n", "END"]'}
    assert records[2].data == {"id": "3", "prompt": "NA", "max_tokens": "007", "stop": "x"}


def test_csv_row_with_wrong_column_count_keeps_its_position(tmp_path):
    lines = ["id,prompt"]
    for i in range(3000):
        lines.append(f"{i},bad,extra" if i in (5, 1700, 2999) else f'{i},"p{i}"')
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    records = list(open_records(str(path), batch_rows=1))  # smallest blocks: many batches
    assert [r.index for r in records] == list(range(3000))
    for r in records:
        if r.index in (5, 1700, 2999):
            assert r.data is None and "expected 2 columns, got 3" in r.error
        else:
            assert r.data == {"id": str(r.index), "prompt": f"p{r.index}"}


def test_a_column_named_twice_refuses_the_input_naming_both_positions(tmp_path):
    # Each record kept the last of the two cells, silently (and --keep-columns all crashed).
    from pagedbatch.io import input_schema

    csv = tmp_path / "a.csv"
    csv.write_text("id,prompt,prompt\nr1,the real prompt,a stale column\n")
    t = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"])
    pq.write_table(t, tmp_path / "b.parquet")
    for path, fmt in ((csv, "csv"), (tmp_path / "b.parquet", "parquet")):
        with pytest.raises(ValueError, match=r"names the column 'prompt' twice \(columns \d and \d\); rename one"):
            open_records(str(path))
    with pytest.raises(ValueError, match="'prompt' twice"):
        input_schema(str(csv), "csv")


def test_csv_type_change_late_in_file_is_not_an_error(tmp_path):
    # Type inference from the first block would make max_tokens int64 and fail later.
    lines = ["prompt,max_tokens"] + [f"p{i},{i}" for i in range(200_000)] + ["late,twelve"]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    records = list(open_records(str(path)))
    assert len(records) == 200_001 and records[-1].data == {"prompt": "late", "max_tokens": "twelve"}


def test_hf_disk_dataset(tmp_path):
    import datasets

    rows = [{"id": str(i), "prompt": f"p{i}", "max_tokens": i + 1} for i in range(50)]
    path = str(tmp_path / "ds")
    datasets.Dataset.from_list(rows).save_to_disk(path)
    assert detect_format(path) == "hf-disk"
    records = list(open_records(path, batch_rows=16))
    assert [r.index for r in records] == list(range(50))
    assert data_of(records) == rows


def test_hf_disk_dataset_dict_with_one_split(tmp_path):
    import datasets

    path = str(tmp_path / "dsd")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(path)
    assert detect_format(path) == "hf-disk"
    assert data_of(open_records(path)) == ROWS


def test_hf_json_array_file(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert detect_format(str(path)) == "hf"
    records = list(open_records(str(path)))
    assert [r.index for r in records] == [0, 1, 2] and data_of(records) == ROWS


def test_hf_arrow_file(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    path = str(tmp_path / "in.arrow")
    with pa.ipc.new_stream(path, table.schema) as w:
        w.write_table(table)
    assert detect_format(path) == "hf"
    assert data_of(open_records(path)) == ROWS


def test_json_lines_with_json_extension_is_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "in.json", ROWS)
    assert detect_format(path) == "jsonl"


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "in.txt", ROWS)
    assert detect_format(path, "jsonl") == "jsonl"
    assert data_of(open_records(path, "jsonl")) == ROWS
    with pytest.raises(ValueError, match="unknown input format 'xml'"):
        detect_format(path, "xml")


def test_missing_path_raises_before_iteration(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        open_records(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        detect_format(missing)


def test_unknown_extension_and_unknown_directory_name_the_path(tmp_path):
    odd = tmp_path / "in.xlsx"
    odd.write_bytes(b"PK")
    with pytest.raises(ValueError, match="in.xlsx"):
        detect_format(str(odd))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ValueError, match="emptydir"):
        open_records(str(empty))


def test_unreadable_parquet_raises_before_iteration(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="in.parquet"):
        open_records(str(path))


def test_unreadable_hf_file_raises_before_iteration(tmp_path):
    path = tmp_path / "in.json"
    path.write_text("[{\"prompt\": \"a\"}, {oops")
    with pytest.raises(ValueError, match="in.json"):
        open_records(str(path))


def test_input_record_is_a_plain_dataclass():
    assert InputRecord(3, None, "bad") == InputRecord(index=3, data=None, error="bad")


# Run in a fresh interpreter: its resident set before and while streaming is the reader's alone, not what
# earlier tests left in pytest's process, and it runs untraced (tracemalloc made this test ~4x slower).
_STREAM_CHILD = """
import gc, os, sys
from pagedbatch.io import ParsedRequest, open_records, parse_record
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
gc.collect()
base = peak = rss()
count = last = 0
for rec in open_records(sys.argv[1]):
    req = parse_record(rec)
    assert type(req) is ParsedRequest, req
    count += 1
    last = req.index
    if count % 5000 == 0:
        peak = max(peak, rss())
print(count, last, peak - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_million_row_jsonl_streams_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    n, chunk = 1_000_000, 50_000
    path = tmp_path / "big.jsonl"
    line = '{"id": "req-%07d", "prompt": "Tell me a short story about item number %07d, please.", "max_tokens": 16}\n'
    with open(path, "w") as f:
        for start in range(0, n, chunk):
            f.write("".join([line % (i, i) for i in range(start, start + chunk)]))
    assert path.stat().st_size >= 60 * 2**20  # holding the file, or its records, would break the bound below

    done = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr
    count, last_index, growth = map(int, done.stdout.split())
    assert count == n and last_index == n - 1
    assert growth < 50 * 2**20, f"resident set grew {growth / 2**20:.1f} MiB while streaming"


def test_file_records_through_an_opener_equal_open_records_for_each_file_format(tmp_path):
    import pyarrow.fs as pafs

    from pagedbatch.io import file_records

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a"}\n\n{"prompt": \n  \n{"prompt": "c"}\n[1]\n{"prompt": "cut')
    csv = tmp_path / "in.csv"
    csv.write_text('id,prompt\n1,"multi\nline"\n2,x,extra\n3,NA\n')
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS * 5), parquet, row_group_size=4)
    fs = pafs.LocalFileSystem()
    for path, fmt in ((jsonl, "jsonl"), (csv, "csv"), (parquet, "parquet")):
        expected = list(open_records(str(path), fmt, batch_rows=3))
        got = list(file_records(str(path), fmt, lambda: fs.open_input_file(str(path)), batch_rows=3))
        assert got == expected, fmt
        assert [r.index for r in got] == list(range(len(got))) and len(got) >= 3
