"""Crash-safe result parts: atomic commits, resume bookkeeping, exactly-once checks, OpenAI output."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from pagedbatch.io import (  # noqa: E402
    PartWriter,
    check_exactly_once,
    cleanup_temp_files,
    committed_indices,
    read_results,
    result_schema,
    write_openai_batch_output,
)


def ok_row(i, **kw):
    return {"index": i, "id": f"r{i}", "output": f"out {i}", "finish_reason": "length", "error": None,
            "prompt_tokens": 3, "output_tokens": 2, "queue_s": 0.0, "ttft_s": 0.1, "latency_s": 0.2,
            "tpot_s": 0.05, "num_preemptions": 0, **kw}


def err_row(i, message):
    return {"index": i, "id": f"r{i}", "output": None, "error": message}


def write_parts(results_dir, groups, shard=0, run_id="run1", schema=None):
    w = PartWriter(str(results_dir), schema or result_schema(), shard_index=shard, run_id=run_id)
    paths = []
    for group in groups:
        for i in group:
            w.add(ok_row(i))
        paths.append(w.commit())
    return paths


def test_result_schema_columns():
    assert result_schema().names == ["index", "id", "sample_index", "output", "finish_reason", "error",
                                     "prompt_tokens", "output_tokens", "queue_s", "ttft_s", "latency_s", "tpot_s",
                                     "num_preemptions", "shard"]
    full = result_schema(include_prompt=True, include_token_ids=True, include_logprobs=True)
    assert full.names[-4:] == ["prompt", "prompt_token_ids", "output_token_ids", "logprobs"]
    assert full.field("output_token_ids").type == pa.list_(pa.int64())
    assert full.field("logprobs").type == pa.list_(pa.float64())
    assert full.field("tpot_s").type == pa.float64() and full.field("tpot_s").nullable


def test_commit_writes_one_named_part_per_call_and_leaves_no_temporaries(tmp_path):
    w = PartWriter(str(tmp_path), result_schema(), shard_index=3, run_id="abc")
    assert w.commit() is None
    w.add(ok_row(0))
    w.add(ok_row(1))
    assert w.pending() == 2
    first = w.commit()
    assert w.pending() == 0
    w.add(err_row(2, "bad row"))
    second = w.commit()
    assert os.path.basename(first) == "part-00003-abc-000000.parquet"
    assert os.path.basename(second) == "part-00003-abc-000001.parquet"
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first), os.path.basename(second)]
    table = read_results(str(tmp_path))
    assert table.column("index").to_pylist() == [0, 1, 2]
    assert table.column("shard").to_pylist() == [3, 3, 3]
    assert table.column("output").to_pylist() == ["out 0", "out 1", None]
    assert table.column("error").to_pylist() == [None, None, "bad row"]


def test_reopened_writer_does_not_overwrite_committed_parts(tmp_path):
    write_parts(tmp_path, [[0], [1]])
    again = write_parts(tmp_path, [[2]])
    assert os.path.basename(again[0]) == "part-00000-run1-000002.parquet"
    assert committed_indices(str(tmp_path)) == {0, 1, 2}


def test_unknown_column_in_row_is_rejected(tmp_path):
    w = PartWriter(str(tmp_path), result_schema(), shard_index=0, run_id="r")
    with pytest.raises(ValueError, match="outptu"):
        w.add({"index": 0, "outptu": "typo"})


def test_failed_commit_keeps_rows_and_leaves_nothing(tmp_path):
    w = PartWriter(str(tmp_path), result_schema(), shard_index=0, run_id="r")
    w.add({"index": "not an int"})
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        w.commit()
    assert w.pending() == 1 and os.listdir(tmp_path) == []


def test_a_full_disk_mid_write_raises_disk_full_naming_the_output_dir_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from pagedbatch.io import DiskFull

    results = tmp_path / "out" / "results"
    w = PartWriter(str(results), result_schema(), shard_index=0, run_id="r")
    w.add(ok_row(0))
    first = w.commit()

    def write_half_then_enospc(table, where, **kw):
        where.write(b"PAR1 half a part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", write_half_then_enospc)
    w.add(ok_row(1))
    with pytest.raises(DiskFull) as e:
        w.commit()
    assert e.value.errno == errno.ENOSPC
    assert f"the disk holding the output directory {tmp_path / 'out'} is full" in str(e.value)
    assert "1 finished rows could not be committed" in str(e.value)
    assert os.listdir(results) == [os.path.basename(first)] and w.pending() == 1
    monkeypatch.undo()
    w.commit()  # space freed: the buffered row commits
    assert committed_indices(str(results)) == {0, 1}


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        PartWriter(str(tmp_path), result_schema(), shard_index=0, run_id="../x")
    with pytest.raises(ValueError, match="shard_index"):
        PartWriter(str(tmp_path), result_schema(), shard_index=-1, run_id="x")


def test_optional_columns_round_trip(tmp_path):
    schema = result_schema(include_prompt=True, include_token_ids=True, include_logprobs=True)
    w = PartWriter(str(tmp_path), schema, shard_index=0, run_id="r")
    w.add(ok_row(0, prompt="p", prompt_token_ids=[1, 2], output_token_ids=[5, 6], logprobs=[-0.1, -2.5]))
    w.commit()
    row = read_results(str(tmp_path)).to_pylist()[0]
    assert row["prompt_token_ids"] == [1, 2] and row["output_token_ids"] == [5, 6] and row["logprobs"] == [-0.1, -2.5]


def test_parts_with_different_optional_columns_are_unified(tmp_path):
    write_parts(tmp_path, [[1]], run_id="old")
    w = PartWriter(str(tmp_path), result_schema(include_prompt=True), shard_index=0, run_id="new")
    w.add(ok_row(0, prompt="p0"))
    w.commit()
    table = read_results(str(tmp_path))
    assert table.column("index").to_pylist() == [0, 1]
    assert table.column("prompt").to_pylist() == ["p0", None]


def test_leftover_temp_file_of_a_killed_run_is_ignored_and_cleaned(tmp_path):
    write_parts(tmp_path, [[0, 1], [2]])
    # What a run killed mid-write leaves: a dot-temp file with no Parquet footer.
    good = (tmp_path / "part-00000-run1-000000.parquet").read_bytes()
    (tmp_path / ".tmp-part-00000-run2-000000.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / ".tmp-part-00001-run2-000000.parquet").write_bytes(b"")
    (tmp_path / "manifest.json").write_text("{}")  # other files are not parts either
    assert committed_indices(str(tmp_path)) == {0, 1, 2}
    assert read_results(str(tmp_path)).column("index").to_pylist() == [0, 1, 2]
    assert check_exactly_once(str(tmp_path), range(3)) == ([], [])
    assert cleanup_temp_files(str(tmp_path), shard_index=1) == 1
    assert cleanup_temp_files(str(tmp_path)) == 1
    assert cleanup_temp_files(str(tmp_path)) == 0
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "part-00000-run1-000000.parquet",
                                            "part-00000-run1-000001.parquet"]


def test_truncated_part_under_a_final_name_is_reported_not_skipped(tmp_path):
    # Our writer cannot leave one (it renames only complete files), so it is
    # outside damage: say which file, rather than silently redo or drop rows.
    write_parts(tmp_path, [[0]])
    good = (tmp_path / "part-00000-run1-000000.parquet").read_bytes()
    (tmp_path / "part-00000-run9-000000.parquet").write_bytes(good[:-20])
    with pytest.raises(ValueError, match="part-00000-run9-000000.parquet"):
        committed_indices(str(tmp_path))
    with pytest.raises(ValueError, match="part-00000-run9-000000.parquet"):
        read_results(str(tmp_path))


def test_committed_indices_reads_only_the_index_column_and_handles_absent_dir(tmp_path):
    assert committed_indices(str(tmp_path / "not-yet")) == set()
    write_parts(tmp_path, [range(0, 500), range(500, 1000)])
    assert committed_indices(str(tmp_path)) == set(range(1000))


def test_check_exactly_once_finds_missing_and_duplicated(tmp_path):
    write_parts(tmp_path, [[0, 1, 2], [2, 5]], shard=0)
    write_parts(tmp_path, [[5, 6]], shard=1)
    missing, duplicated = check_exactly_once(str(tmp_path), range(8))
    assert missing == [3, 4, 7]
    assert duplicated == [2, 5]


def test_read_results_sorted_by_index_across_shards(tmp_path):
    write_parts(tmp_path, [[5, 1], [3]], shard=1)
    write_parts(tmp_path, [[4, 0, 2]], shard=0)
    assert read_results(str(tmp_path)).column("index").to_pylist() == [0, 1, 2, 3, 4, 5]


def test_samples_sort_by_index_then_sample_index_and_count_once_per_pair(tmp_path):
    w = PartWriter(str(tmp_path), result_schema(), shard_index=0, run_id="r")
    for i, j in ((1, 1), (0, 0), (1, 0), (2, 0), (2, 0)):
        w.add(ok_row(i, sample_index=j))
    w.commit()
    table = read_results(str(tmp_path))
    assert list(zip(table.column("index").to_pylist(), table.column("sample_index").to_pylist())) == [
        (0, 0), (1, 0), (1, 1), (2, 0), (2, 0)]
    assert check_exactly_once(str(tmp_path), range(4)) == ([3], [2])  # 1's two samples are not a duplicate


def test_read_results_of_empty_and_missing_dirs(tmp_path):
    assert read_results(str(tmp_path)).num_rows == 0
    with pytest.raises(FileNotFoundError):
        read_results(str(tmp_path / "missing"))


def test_openai_batch_output_is_valid_jsonl(tmp_path):
    results = tmp_path / "results"
    w = PartWriter(str(results), result_schema(), shard_index=0, run_id="r")
    w.add(ok_row(1, id="custom-b", output="second", finish_reason="stop"))
    w.add(err_row(2, "field 'prompt' is an empty string"))
    w.add(ok_row(0, id="custom-a", output="first", prompt_tokens=4, output_tokens=6))
    w.commit()
    out = tmp_path / "out" / "output.jsonl"
    out.parent.mkdir()
    write_openai_batch_output(str(results), str(out))
    assert os.listdir(out.parent) == ["output.jsonl"]  # no temporary left
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["custom-a", "custom-b", "r2"]
    a, b, bad = lines
    assert a["id"] == "batch_req_0" and a["error"] is None
    assert a["response"]["status_code"] == 200
    body = a["response"]["body"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "first" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    assert b["response"]["body"]["choices"][0]["finish_reason"] == "stop"
    assert bad["response"] is None
    assert bad["error"] == {"code": "invalid_request", "message": "field 'prompt' is an empty string"}


def test_openai_output_with_index_ids_and_chat_rows(tmp_path):
    schema = result_schema().append(pa.field("is_chat", pa.bool_()))
    w = PartWriter(str(tmp_path / "res"), schema, shard_index=0, run_id="r")
    w.add(ok_row(0, is_chat=True, output="hello"))
    w.commit()
    out = tmp_path / "o.jsonl"
    write_openai_batch_output(str(tmp_path / "res"), str(out), ids_are_custom=False)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["custom_id"] == "0"
    body = line["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}


def test_openai_output_has_one_line_per_record_with_its_samples_as_choices(tmp_path):
    w = PartWriter(str(tmp_path / "res"), result_schema(), shard_index=0, run_id="r")
    w.add(ok_row(0, sample_index=1, output="b", output_tokens=5))
    w.add(ok_row(0, sample_index=0, output="a", output_tokens=2, finish_reason="stop"))
    w.add(ok_row(1, sample_index=0, output="c"))
    for j in range(2):
        w.add({**err_row(2, "prompt too long"), "sample_index": j})
    w.commit()
    out = tmp_path / "o.jsonl"
    write_openai_batch_output(str(tmp_path / "res"), str(out))
    first, second, bad = [json.loads(x) for x in out.read_text().splitlines()]
    body = first["response"]["body"]
    choices = [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]]
    assert choices == [(0, "a", "stop"), (1, "b", "length")]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}  # the prompt once
    assert len(second["response"]["body"]["choices"]) == 1
    assert bad["response"] is None and bad["error"]["message"] == "prompt too long"


def test_parts_are_plain_parquet_readable_by_pyarrow(tmp_path):
    (path,) = write_parts(tmp_path, [[0, 1]])
    assert pq.read_table(path).num_rows == 2
