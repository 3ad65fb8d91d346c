"""--keep-columns: which input columns are carried, under which names and Arrow types, decided before any work."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pagedbatch.io.carried import SAMPLE_ROWS, decide_carried_columns

PARQUET_SCHEMA = pa.schema([
    ("id", pa.int64()), ("article", pa.string()), ("n", pa.int32()),
    ("meta", pa.struct([("title", pa.string()), ("year", pa.int64())])), ("tags", pa.list_(pa.string())),
    ("output", pa.string()), ("label", pa.dictionary(pa.int8(), pa.string())),
])


@pytest.fixture
def parquet_input(tmp_path):
    rows = [{"id": 1, "article": "a", "n": 1, "meta": {"title": "t", "year": 2020}, "tags": ["x"], "output": "ref",
             "label": "pos"}]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)
    return str(path)


def test_parquet_columns_keep_their_arrow_types_and_result_names_become_input_names(parquet_input):
    carried, warnings = decide_carried_columns(parquet_input, "parquet", "all")
    fields = {f.name: f.type for f in carried.fields}
    assert list(fields) == ["input_id", "article", "n", "meta", "tags", "input_output", "label"]
    assert fields["input_id"] == pa.int64() and fields["n"] == pa.int32()
    assert fields["meta"] == PARQUET_SCHEMA.field("meta").type and pa.types.is_list(fields["tags"])
    assert fields["label"] == pa.string()  # a dictionary column is carried as its values
    assert warnings == []
    named, _ = decide_carried_columns(parquet_input, "parquet", ["meta", "id"])
    assert [f.name for f in named.fields] == ["meta", "input_id"]


def test_a_named_column_the_parquet_schema_lacks_is_refused_before_any_work(parquet_input):
    with pytest.raises(ValueError, match=r"keep_columns \(--keep-columns\): 'body' not in the input .*article"):
        decide_carried_columns(parquet_input, "parquet", ["article", "body"])


def test_a_column_written_twice_after_renaming_is_refused(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"output": ["a"], "input_output": ["b"]}), path)
    with pytest.raises(ValueError, match="'input_output' would be written twice"):
        decide_carried_columns(str(path), "parquet", "all")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_types_are_inferred_from_the_first_records_and_mixed_columns_are_carried_as_text(tmp_path):
    rows = [{"n": 1, "x": 0.5, "meta": {"a": 1}, "tags": ["p"], "mixed": 1, "empty": []},
            {"n": 2, "x": 1, "meta": {"b": "s"}, "tags": [], "mixed": "two", "empty": [], "late": None}]
    carried, _ = decide_carried_columns(_jsonl(tmp_path / "in.jsonl", rows), "jsonl", "all")
    fields = {f.name: f.type for f in carried.fields}
    assert fields == {"n": pa.int64(), "x": pa.float64(), "meta": pa.struct([("a", pa.int64()), ("b", pa.string())]),
                      "tags": pa.list_(pa.string()), "mixed": pa.string(), "empty": pa.string(),
                      "late": pa.string()}
    values, problem = carried.values({"n": 3, "mixed": [1, "x"], "tags": ["q"], "empty": []})
    assert problem is None
    assert values["mixed"] == '[1, "x"]' and values["empty"] == "[]" and values["x"] is None  # absent: null
    values, problem = carried.values({"n": "three"})
    assert values["n"] is None
    assert problem.startswith("keep column 'n': str 'three' does not fit the column's type int64 (inferred "
                              f"from the input's first {SAMPLE_ROWS} records")


def test_booleans_beside_numbers_are_carried_as_text_not_turned_into_one_and_zero(tmp_path):
    # pyarrow infers double for [2.5, true] and converts true to 1.0, silently.
    rows = [{"score": 2.5, "flags": [0.5], "meta": {"v": 1.5}, "ok": 1.0}, {"score": True, "flags": [False],
                                                                            "meta": {"v": True}, "ok": 2.0}]
    carried, _ = decide_carried_columns(_jsonl(tmp_path / "in.jsonl", rows), "jsonl", "all")
    fields = {f.name: f.type for f in carried.fields}
    assert fields == {"score": pa.string(), "flags": pa.string(), "meta": pa.string(), "ok": pa.float64()}
    assert carried.values(rows[1])[0] == {"score": "true", "flags": "[false]", "meta": '{"v": true}', "ok": 2.0}
    # A boolean arriving after the sample, into a column inferred numeric: null, with the reason.
    values, problem = carried.values({"ok": True})
    assert values["ok"] is None and "bool True does not fit the column's type double" in problem
    assert "a boolean in a numeric column" in problem


def test_a_named_jsonl_column_in_no_record_is_an_error_or_a_warning_when_the_sample_is_not_the_whole_input(tmp_path):
    small = _jsonl(tmp_path / "small.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="'topic' in no record of"):
        decide_carried_columns(small, "jsonl", ["topic"])
    big = _jsonl(tmp_path / "big.jsonl", [{"prompt": "p"}] * SAMPLE_ROWS + [{"prompt": "p", "topic": "t"}])
    carried, warnings = decide_carried_columns(big, "jsonl", ["topic"])
    assert [f.type for f in carried.fields] == [pa.string()]
    assert warnings and "'topic' in none of the first" in warnings[0]


def test_csv_columns_come_from_the_header_as_strings(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,prompt,year\n1,hi,2020\n")
    carried, _ = decide_carried_columns(str(path), "csv", "all")
    assert [(f.name, f.type) for f in carried.fields] == [("input_id", pa.string()), ("input_prompt", pa.string()),
                                                          ("year", pa.string())]
    with pytest.raises(ValueError, match="'topic' not in the input"):
        decide_carried_columns(str(path), "csv", ["topic"])


def test_a_datasets_folder_gives_its_features_types(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a"], "label": [1], "score": [0.5]}, features=datasets.Features(
        {"prompt": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "y"]),
         "score": datasets.Value("float32")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    carried, _ = decide_carried_columns(str(tmp_path / "ds"), "hf-disk", ["label", "score"])
    assert [(f.name, f.type) for f in carried.fields] == [("label", pa.int64()), ("score", pa.float32())]
