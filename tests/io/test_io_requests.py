"""Records to requests: the three prompt kinds, sampling overrides, and a RowError naming the field for every problem."""
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from pagedbatch import SamplingParams  # noqa: E402
from pagedbatch.io import (  # noqa: E402
    SAMPLING_FIELDS,
    FieldNames,
    InputRecord,
    ParsedRequest,
    RowError,
    open_records,
    parse_record,
)


def parse(data, fmt="jsonl", fields=FieldNames(), index=4):
    return parse_record(InputRecord(index, data, None), fields, fmt)


def error_of(data, fmt="jsonl", fields=FieldNames()):
    out = parse(data, fmt, fields)
    assert isinstance(out, RowError), out
    return out.error


# --- valid requests -----------------------------------------------------------


def test_prompt_row_with_sampling_overrides():
    out = parse({"id": "q1", "prompt": "Hi", "max_tokens": 12, "temperature": 0, "stop": ["\n"], "ignore_eos": True,
                 "extra_column": "kept out"})
    assert out == ParsedRequest(4, "q1", "Hi", None, None,
                                {"max_tokens": 12, "temperature": 0.0, "stop": ["\n"], "ignore_eos": True})


def test_id_defaults_to_index_and_int_ids_become_strings():
    assert parse({"prompt": "Hi"}).id == "4"
    assert parse({"prompt": "Hi", "id": 17}).id == "17"
    assert parse({"prompt": "Hi", "id": 17.0}).id == "17"


def test_messages_and_token_ids():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = parse({"messages": msgs})
    assert out.messages == msgs and out.prompt is None and out.prompt_token_ids is None
    out = parse({"prompt_token_ids": [1, 2, 3]})
    assert out.prompt_token_ids == [1, 2, 3] and out.prompt is None and out.messages is None


def test_custom_field_names():
    fields = FieldNames(prompt="text", id="uid")
    out = parse({"uid": "x", "text": "Hello"}, fields=fields)
    assert (out.id, out.prompt) == ("x", "Hello")
    assert "'text'" in error_of({"prompt": "ignored name"}, fields=fields)


def test_every_sampling_field_is_accepted_and_builds_sampling_params():
    data = {"prompt": "p", "max_tokens": 9, "min_tokens": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
            "min_p": 0.05, "seed": 3, "stop": "END", "stop_token_ids": [2], "presence_penalty": 0.1,
            "frequency_penalty": 0.2, "repetition_penalty": 1.1, "ignore_eos": False, "logprobs": 2, "n": 3}
    assert set(data) - {"prompt"} == set(SAMPLING_FIELDS)
    out = parse(data)
    assert set(out.sampling) == set(SAMPLING_FIELDS)
    SamplingParams(**out.sampling)  # range checks happen there


def test_none_and_nan_sampling_values_mean_not_given():
    out = parse({"prompt": "p", "max_tokens": None, "temperature": math.nan, "seed": None, "stop": None})
    assert out.sampling == {}


def test_integral_floats_are_accepted_for_integer_fields():
    # A Parquet/pandas integer column with missing cells is float.
    assert parse({"prompt": "p", "max_tokens": 12.0}).sampling == {"max_tokens": 12}


def test_parquet_rows_with_missing_cells_parse(tmp_path):
    rows = [{"prompt": "a", "max_tokens": 5, "temperature": 0.5, "messages": None},
            {"prompt": None, "max_tokens": None, "temperature": None,
             "messages": [{"role": "user", "content": "b"}]}]
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    outs = [parse_record(r, FieldNames(), "parquet") for r in open_records(path)]
    assert outs[0].prompt == "a" and outs[0].sampling == {"max_tokens": 5, "temperature": 0.5}
    assert outs[1].messages == [{"role": "user", "content": "b"}] and outs[1].sampling == {}


# --- CSV decoding -------------------------------------------------------------


def test_csv_strings_are_decoded(tmp_path):
    path = tmp_path / "in.csv"
    msgs = json.dumps([{"role": "user", "content": "Hi, there"}]).replace('"', '""')
    path.write_text(
        "id,prompt,messages,prompt_token_ids,max_tokens,temperature,stop,stop_token_ids,ignore_eos,seed\n"
        f'a,Hello,,,12,0.5,"[""\\n"", ""END""]",[2],true,\n'
        f'b,,"{msgs}",,,,plain,,,7\n'
        'c,,,"[1, 2, 3]",3.0,,[not json,,0,\n'
    )
    outs = [parse_record(r, FieldNames(), "csv") for r in open_records(str(path))]
    assert outs[0] == ParsedRequest(0, "a", "Hello", None, None, {
        "max_tokens": 12, "temperature": 0.5, "stop": ["\n", "END"], "stop_token_ids": [2], "ignore_eos": True})
    assert outs[1] == ParsedRequest(1, "b", None, [{"role": "user", "content": "Hi, there"}], None,
                                    {"stop": "plain", "seed": 7}, source="messages")
    assert outs[2] == ParsedRequest(2, "c", None, None, [1, 2, 3],
                                    {"max_tokens": 3, "stop": "[not json", "ignore_eos": False},
                                    source="prompt_token_ids")


def test_csv_bad_number_names_the_field():
    assert error_of({"prompt": "p", "max_tokens": "12a"}, fmt="csv") == \
        "field 'max_tokens' must be an integer, got str '12a'"
    assert "field 'temperature' must be a number" in error_of({"prompt": "p", "temperature": "hot"}, fmt="csv")
    assert "field 'ignore_eos' must be a boolean" in error_of({"prompt": "p", "ignore_eos": "maybe"}, fmt="csv")
    assert "field 'messages' is a string that is not valid JSON" in error_of({"messages": "[{"}, fmt="csv")


# --- RowError cases -----------------------------------------------------------


def test_reader_error_becomes_row_error_with_index_id():
    out = parse_record(InputRecord(7, None, "line 8: malformed JSON: x"))
    assert out == RowError(7, "7", "line 8: malformed JSON: x")


def test_missing_prompt_names_the_fields_looked_for():
    msg = error_of({"id": "x", "text": "hello"})
    assert msg.startswith("missing prompt")
    assert "'prompt'" in msg and "'messages'" in msg and "'prompt_token_ids'" in msg and "'text'" in msg
    assert parse({"id": "x"}).id == "x"


def test_both_prompt_and_messages():
    msg = error_of({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert "'prompt'" in msg and "'messages'" in msg and "exactly one" in msg


def test_empty_prompt_string():
    assert error_of({"prompt": ""}) == "field 'prompt' is an empty string"


@pytest.mark.parametrize("value", [17, ["a"], {"text": "a"}, True])
def test_prompt_of_wrong_type(value):
    assert error_of({"prompt": value}).startswith("field 'prompt' must be a string, got")


@pytest.mark.parametrize("field,value,expected", [
    ("max_tokens", "12a", "field 'max_tokens' must be an integer, got str '12a'"),
    ("max_tokens", 12.5, "field 'max_tokens' must be an integer, got float 12.5"),
    ("seed", True, "field 'seed' must be an integer, got bool True"),
    ("logprobs", True, "field 'logprobs' must be an integer"),
    ("temperature", "0.5", "field 'temperature' must be a number, got str '0.5'"),
    ("top_p", [1], "field 'top_p' must be a number, got list"),
    ("stop", 5, "field 'stop' must be a string or a list of strings, got int 5"),
    ("stop", ["a", 1], "field 'stop' must be a string or a list of strings"),
    ("stop_token_ids", [1, "2"], "field 'stop_token_ids' must be a list of integers"),
    ("ignore_eos", 1, "field 'ignore_eos' must be a boolean, got int 1"),
    ("n", "four", "field 'n' must be an integer, got str 'four'"),
    ("n", 2.5, "field 'n' must be an integer, got float 2.5"),
])
def test_wrong_sampling_types_name_the_field(field, value, expected):
    assert error_of({"prompt": "p", field: value}).startswith(expected)


def test_sampling_values_are_not_range_checked_here():
    assert parse({"prompt": "p", "temperature": -3, "max_tokens": 0}).sampling == {"temperature": -3.0, "max_tokens": 0}


@pytest.mark.parametrize("messages,problem", [
    ([], "must be a non-empty list"),
    ("hello", "not valid JSON"),
    ({"role": "user", "content": "x"}, "must be a non-empty list"),
    (["hi"], "message 0 must be an object"),
    ([{"content": "x"}], "message 0: 'role' must be a non-empty string"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], "message 1: 'content' must be a string, got null (only an "
                                                            "assistant message may leave it out)"),
    ([{"role": "user", "content": 5}], "message 0: 'content' must be a string, got int 5"),
])
def test_bad_messages_name_the_field(messages, problem):
    msg = error_of({"messages": messages})
    assert msg.startswith("field 'messages'") and problem in msg


def test_an_assistant_message_without_content_is_empty_text_as_on_the_server():
    out = parse({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                              {"role": "user", "content": "b"}]})
    assert out.messages[1] == {"role": "assistant", "content": ""}


def test_messages_with_text_parts_are_joined():
    out = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert out.messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("ids", [[], [1, -2], [1, 2.5], [True], "abc", 5])
def test_bad_prompt_token_ids_name_the_field(ids):
    msg = error_of({"prompt_token_ids": ids})
    assert msg.startswith("field 'prompt_token_ids'")


@pytest.mark.parametrize("value", [[1], {"a": 1}, ""])
def test_bad_id_names_the_field_and_falls_back_to_index(value):
    out = parse({"id": value, "prompt": "p"})
    assert isinstance(out, RowError) and out.id == "4" and out.error.startswith("field 'id'")


def test_row_error_keeps_the_row_id():
    out = parse({"id": "keep-me", "prompt": ""})
    assert out.id == "keep-me" and out.index == 4


# --- OpenAI batch requests ----------------------------------------------------


def openai(body, url="/v1/completions", custom_id="req-1", **extra):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def test_openai_completion_request():
    out = parse(openai({"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 1,
                        "stop": ["x"], "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 2}), "openai")
    assert out == ParsedRequest(4, "req-1", "Hi", None, None, {
        "max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "seed": 1, "stop": ["x"],
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 2}, source="body.prompt")


def test_openai_chat_request_maps_max_completion_tokens_and_top_logprobs():
    msgs = [{"role": "user", "content": "Hi"}]
    out = parse(openai({"messages": msgs, "max_completion_tokens": 8, "logprobs": True, "top_logprobs": 3},
                       url="/v1/chat/completions"), "openai")
    assert out.messages == msgs and out.id == "req-1"
    assert out.sampling == {"max_tokens": 8, "logprobs": 3}
    out = parse(openai({"messages": msgs, "logprobs": True}, url="/v1/chat/completions"), "openai")
    assert out.sampling == {"logprobs": 0}
    out = parse(openai({"messages": msgs, "logprobs": False}, url="/v1/chat/completions"), "openai")
    assert out.sampling == {}


def test_openai_n_asks_for_n_choices():
    assert parse(openai({"prompt": "Hi", "n": 3}), "openai").sampling == {"n": 3}
    assert parse(openai({"prompt": "Hi", "n": 1}), "openai").sampling == {"n": 1}


def test_openai_token_id_prompt():
    assert parse(openai({"prompt": [1, 2, 3]}), "openai").prompt_token_ids == [1, 2, 3]
    assert parse(openai({"prompt": ["only one"]}), "openai").prompt == "only one"


@pytest.mark.parametrize("row,expected", [
    (openai({"prompt": "Hi"}, url="/v1/embeddings"), "field 'url' must be one of"),
    (openai({"prompt": "Hi"}, url=None), "field 'url' must be one of"),
    (openai({"prompt": "Hi"}, method="GET"), "field 'method' must be 'POST'"),
    (openai("not an object"), "field 'body' must be an object"),
    (openai({}), "missing prompt: /v1/completions needs 'body.prompt'"),
    (openai({}, url="/v1/chat/completions"), "missing prompt: /v1/chat/completions needs 'body.messages'"),
    (openai({"prompt": "Hi"}, url="/v1/chat/completions"), "field 'body.prompt' is not accepted"),
    (openai({"messages": [{"role": "user", "content": "x"}]}), "field 'body.messages' is not accepted"),
    (openai({"prompt": ""}), "field 'body.prompt' is an empty string"),
    (openai({"prompt": ["a", "b"]}), "field 'body.prompt' must be one string"),
    (openai({"messages": [{"role": "user"}]}, url="/v1/chat/completions"), "field 'body.messages' message 0"),
    (openai({"prompt": "Hi", "max_tokens": "5"}), "field 'body.max_tokens' must be an integer, got str '5'"),
    (openai({"prompt": "Hi", "max_completion_tokens": 1.5}), "field 'body.max_completion_tokens' must be an integer"),
    (openai({"prompt": "Hi", "temperature": "x"}), "field 'body.temperature' must be a number"),
    (openai({"prompt": "Hi", "n": "2"}), "field 'body.n' must be an integer, got str '2'"),
    (openai({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, url="/v1/chat/completions"),
     "field 'body.logprobs' must be a boolean"),
    # Options the engine does not implement are refused, not silently ignored (as the server does).
    (openai({"prompt": "Hi", "echo": True}), "field 'body.echo' is not supported"),
    (openai({"prompt": "Hi", "best_of": 3}), "field 'body.best_of' is not supported"),
    (openai({"prompt": "Hi", "suffix": "end"}), "field 'body.suffix' is not supported"),
    (openai({"prompt": "Hi", "logit_bias": {"5": 10}}), "field 'body.logit_bias' is not supported"),
    (openai({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            url="/v1/chat/completions"), "field 'body.tools' is not supported"),
])
def test_openai_errors_name_the_field(row, expected):
    out = parse(row, "openai")
    assert isinstance(out, RowError) and out.id == "req-1", out
    assert out.error.startswith(expected), out.error


def test_openai_options_at_their_unused_values_are_accepted():
    out = parse(openai({"prompt": "Hi", "echo": False, "best_of": 1, "suffix": "", "logit_bias": {}, "tools": [],
                        "user": "u1", "stream": False}), "openai")
    assert not isinstance(out, RowError), out


def test_openai_missing_custom_id():
    out = parse({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}, "openai")
    assert isinstance(out, RowError) and out.id == "4" and "field 'custom_id'" in out.error


def test_openai_file_end_to_end(tmp_path):
    rows = [openai({"prompt": "a", "max_tokens": 2}, custom_id="r1"),
            openai({"prompt": "b"}, url="/v1/nope", custom_id="r2"),
            openai({"messages": [{"role": "user", "content": "c"}]}, url="/v1/chat/completions", custom_id="r3")]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = [parse_record(r, fmt="openai") for r in open_records(str(path))]
    assert [type(o).__name__ for o in outs] == ["ParsedRequest", "RowError", "ParsedRequest"]
    assert [o.id for o in outs] == ["r1", "r2", "r3"] and [o.index for o in outs] == [0, 1, 2]
