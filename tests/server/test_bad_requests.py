"""Bad requests get a 4xx JSON error naming the field, and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

OK = {"prompt": "dog hello 42", "max_tokens": 4, "temperature": 0}


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, param):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]
    if param not in (None, "body"):
        assert param.split("[")[0].split(".")[0] in error["message"] or param == "model"
    return error


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", [b'{"prompt": "hi", "max_tokens": 4', b"not json at all", b"", b"\xff\xfe"])
def test_malformed_json_is_a_400_naming_the_body(server, path, body):
    error = assert_error(post(server, path, content=body), 400, "body")
    assert "JSON" in error["message"]


def test_a_json_body_that_is_not_an_object_is_a_400(server):
    assert_error(post(server, "/generate", json=["hi"]), 400, "body")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "ten"), ("max_tokens", 1.5), ("max_tokens", True), ("temperature", "hot"), ("prompt", 5),
    ("prompt", [1, "a"]), ("stop", 3), ("seed", "1"), ("stream", "yes"), ("ignore_eos", 1),
])
def test_wrong_types_are_a_422_naming_the_field(server, field, value):
    assert_error(post(server, "/generate", json={**OK, field: value}), 422, field)


def test_an_unknown_field_on_generate_is_named(server):
    error = assert_error(post(server, "/generate", json={**OK, "temprature": 0.5}), 422, "temprature")
    assert "unknown field" in error["message"]


def test_a_nested_field_error_names_its_path(server):
    body = {"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}], "max_tokens": 4}
    assert_error(post(server, "/v1/chat/completions", json=body), 422, "messages[1].role")


def test_a_message_without_content_is_a_400_unless_it_is_an_assistants(server):
    # As the batch job's rows: a null content is OpenAI's form of an assistant turn that only called tools.
    body = {"messages": [{"role": "user"}], "max_tokens": 2}
    error = assert_error(post(server, "/v1/chat/completions", json=body), 400, "messages[0].content")
    assert "only an assistant" in error["message"]
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                         {"role": "user", "content": "again"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("field, value", [("top_p", 2.0), ("temperature", -1.0), ("top_k", -5), ("min_tokens", 9),
                                          ("max_tokens", 0)])
def test_out_of_range_sampling_values_are_a_400_naming_the_field(server, field, value):
    assert_error(post(server, "/generate", json={**OK, field: value}), 400, field)


@pytest.mark.parametrize("path, field", [("/generate", "max_tokens"), ("/v1/completions", "max_tokens"),
                                         ("/v1/chat/completions", "max_completion_tokens")])
def test_min_tokens_above_the_default_max_tokens_is_checked_against_the_requests_own(server, path, field):
    # It was checked against SamplingParams' default max_tokens (256) and refused.
    body = {"max_tokens": 300, "min_tokens": 257, "temperature": 0}
    body = {**body, "messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {**body, "prompt": "hi"}
    if field != "max_tokens":
        body[field] = body.pop("max_tokens")
    r = post(server, path, json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] >= 257
    assert_error(post(server, path, json={**body, field: 200}), 400, "min_tokens")


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions"])
def test_max_tokens_above_the_model_limit_is_a_400(server, path):
    error = assert_error(post(server, path, json={**OK, "max_tokens": 5000}), 400, "max_tokens")
    assert "2048" in error["message"]
    # Within the cap but not beside this prompt: still refused up front, not failed half-way.
    error = assert_error(post(server, path, json={**OK, "max_tokens": 2046}), 400, "max_tokens")
    assert "exceeds" in error["message"]


def test_a_prompt_longer_than_the_model_is_a_400_naming_the_prompt(server):
    assert_error(post(server, "/generate", json={**OK, "prompt": [5] * 2048}), 400, "prompt")
    assert_error(post(server, "/generate", json={**OK, "prompt": [5, 100000]}), 400, "prompt")


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_is_a_404_model_not_found_naming_the_model(server, path):
    # OpenAI's answer (and vLLM's): the openai client raises NotFoundError for it.
    body = {**OK, "model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]}
    if path != "/v1/chat/completions":
        del body["messages"]
    else:
        del body["prompt"]
    error = assert_error(post(server, path, json=body), 404, "model")
    assert "gpt-nope" in error["message"] and "tiny-llama" in error["message"]
    assert error["code"] == "model_not_found"


def test_a_model_is_retrieved_by_its_name_and_another_is_model_not_found(server):
    r = httpx.get(server.url + "/v1/models/tiny-llama", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "tiny-llama" and r.json()["object"] == "model"
    assert r.json() == httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    r = httpx.get(server.url + "/v1/models/org/gpt-nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_max_completion_tokens_errors_name_that_field(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}
    error = assert_error(post(server, "/v1/chat/completions", json=body), 400, "max_completion_tokens")
    assert "max_completion_tokens 100000" in error["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}
    assert_error(post(server, "/v1/chat/completions", json=body), 400, "max_tokens")


def test_generate_needs_exactly_one_of_prompt_and_messages(server):
    assert_error(post(server, "/generate", json={"max_tokens": 4}), 400, "prompt")
    both = {**OK, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, "/generate", json=both), 400, "prompt")


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 3)])
def test_openai_options_we_cannot_honour_are_refused(server, field, value):
    assert_error(post(server, "/v1/completions", json={**OK, field: value}), 400, field)


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_n_out_of_range_is_a_400_naming_n(server, path):
    assert_error(post(server, path, json={**OK, "n": 0}), 400, "n")
    error = assert_error(post(server, path, json={**OK, "n": 257}), 400, "n")
    assert "256" in error["message"]  # the engine's max_num_seqs: a request's samples run together
    assert_error(post(server, path, json={**OK, "n": "2"}), 422, "n")


def test_a_body_over_the_size_limit_is_a_413(server):
    import json

    big = json.dumps({**OK, "prompt": "x" * (server.settings.max_body_bytes + 10)}).encode()
    error = assert_error(post(server, "/generate", content=big), 413, "body")
    assert error["message"].startswith(f"the request body is {len(big)} bytes;")  # Content-Length: exact

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    assert "the request body is at least" in assert_error(post(server, "/generate", content=chunked()), 413,
                                                          "body")["message"]


def test_unknown_routes_and_methods_answer_in_the_same_error_shape(server):
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/generate")
    assert r.status_code == 405 and "error" in r.json()


def test_the_server_still_serves_after_bad_requests(server):
    for body in (b"{", b'{"prompt": 1}', b'{"prompt": "x", "max_tokens": 99999}'):
        assert post(server, "/generate", content=body).status_code in (400, 422)
    r = post(server, "/generate", json=OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    stats = server.wait_idle()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["requests_failed"] == 0
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "Hi \ud83d there", "max_tokens": 3}),
    ("/v1/completions", {"model": "tiny-llama", "prompt": ["fine", "Hi \udc00"], "max_tokens": 3}),
])
def test_a_prompt_with_a_lone_surrogate_is_a_400_and_the_server_keeps_serving(server, path, body):
    # JSON may escape half of a UTF-16 pair; the tokenizer then raised a TypeError inside the engine loop,
    # the loop thread died, this request hung and every later one got 503.
    r = post(server, path, content=__import__("json").dumps(body).encode())  # "\ud83d" escaped, as clients send it
    assert r.status_code == 400, r.text
    assert "not valid Unicode: it holds a lone surrogate" in r.json()["error"]["message"]
    assert server.health()["status"] == "ok"
    assert post(server, "/generate", json=OK).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_without_stream_is_a_400_as_openai_answers(server, path):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    body = {**body, "max_tokens": 2, "stream_options": {"include_usage": True}}
    assert_error(post(server, path, json=body), 400, "stream_options")
    assert post(server, path, json={**body, "stream": True}).status_code == 200
