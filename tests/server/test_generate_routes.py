"""/health, /generate and /generate_stream against a real server, compared with the offline engine."""
from __future__ import annotations

import json

import httpx

from model_factory import SAFE_PROMPTS
from pagedbatch import SamplingParams
from pagedbatch.engine.tokenizer import encode_chat

GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)


def sse_events(response: httpx.Response):
    """The JSON events of an SSE response, checking it ends with [DONE]."""
    done = False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        yield json.loads(data)
    assert done, "the stream did not end with data: [DONE]"


def test_health_names_the_model_and_reports_an_idle_engine(server):
    body = server.health()
    assert body["status"] == "ok" and body["model"] == "tiny-llama"
    assert body["max_model_len"] == 2048
    engine = body["engine"]
    assert engine["free_blocks"] == engine["num_blocks"] == 512
    assert engine["num_unfinished"] == 0 and engine["active_requests"] == 0


def test_generate_equals_offline_greedy_output(server, offline):
    prompt = SAFE_PROMPTS[4]
    ref = offline.generate([prompt], SamplingParams(**GREEDY))[0]
    r = httpx.post(server.url + "/generate", json={"prompt": prompt, **GREEDY}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == ref.text and body["token_ids"] == ref.token_ids
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 24,
                             "total_tokens": ref.prompt_tokens + 24}
    assert body["model"] == "tiny-llama"


def test_generate_accepts_token_ids_and_chat_messages(server, offline):
    ids = offline.tokenizer(SAFE_PROMPTS[0])["input_ids"]
    ref = offline.generate([ids], SamplingParams(**GREEDY))[0]
    r = httpx.post(server.url + "/generate", json={"prompt": ids, **GREEDY}, timeout=30)
    assert r.json()["token_ids"] == ref.token_ids

    messages = [{"role": "user", "content": SAFE_PROMPTS[1]}]
    ref = offline.generate([encode_chat(offline.tokenizer, messages)], SamplingParams(**GREEDY))[0]
    r = httpx.post(server.url + "/generate", json={"messages": messages, **GREEDY}, timeout=30)
    assert r.json()["text"] == ref.text


def test_generate_returns_logprobs_of_the_chosen_tokens_when_asked(server):
    r = httpx.post(server.url + "/generate", json={"prompt": SAFE_PROMPTS[3], **GREEDY, "logprobs": 2}, timeout=30)
    body = r.json()
    assert [lp["token_id"] for lp in body["logprobs"]] == body["token_ids"]
    for lp in body["logprobs"]:
        assert lp["logprob"] <= 0 and len(lp["top"]) == 2
        assert lp["top"][0][0] == lp["token_id"]  # greedy: the chosen token is the most likely


def test_generate_with_stream_true_streams_as_generate_stream_does(server, offline):
    ref = offline.generate([SAFE_PROMPTS[2]], SamplingParams(**GREEDY))[0]
    with httpx.stream("POST", server.url + "/generate", json={"prompt": SAFE_PROMPTS[2], **GREEDY, "stream": True},
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert "".join(e["text"] for e in events) == ref.text


def test_stream_chunks_join_to_the_offline_text_and_arrive_while_the_request_runs(server, offline):
    params = dict(temperature=0, max_tokens=300, ignore_eos=True)
    ref = offline.generate([SAFE_PROMPTS[5]], SamplingParams(**params))[0]
    texts, token_ids, running_at_first_chunk = [], [], None
    with httpx.stream("POST", server.url + "/generate_stream", json={"prompt": SAFE_PROMPTS[5], **params},
                      timeout=30) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            if running_at_first_chunk is None:
                # The first token is here; the other 299 cannot all be done yet if chunks are sent as made.
                running_at_first_chunk = server.stats()["active_requests"]
            texts.append(event["text"])
            token_ids += event["token_ids"]
            last = event
    assert running_at_first_chunk == 1
    assert len(texts) == 300
    assert "".join(texts) == ref.text and token_ids == ref.token_ids
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 300


def test_generate_with_n_answers_a_list_of_samples_and_streams_them_by_sample_index(server, offline):
    params = dict(temperature=1.0, seed=4, max_tokens=10, ignore_eos=True)
    refs = offline.generate([SAFE_PROMPTS[3]], SamplingParams(n=3, **params))
    r = httpx.post(server.url + "/generate", json={"prompt": SAFE_PROMPTS[3], "n": 3, **params, "logprobs": 0},
                   timeout=30)
    body = r.json()
    assert "text" not in body and body["usage"]["completion_tokens"] == 30
    assert [(s["sample_index"], s["token_ids"], s["text"]) for s in body["samples"]] == [
        (j, ref.token_ids, ref.text) for j, ref in enumerate(refs)]
    assert all(len(s["logprobs"]) == 10 and s["finish_reason"] == "length" for s in body["samples"])
    streamed = {0: [], 1: [], 2: []}
    with httpx.stream("POST", server.url + "/generate_stream", json={"prompt": SAFE_PROMPTS[3], "n": 3, **params},
                      timeout=30) as r:
        for event in sse_events(r):
            streamed[event["sample_index"]] += event["token_ids"]
    assert [streamed[j] for j in range(3)] == [ref.token_ids for ref in refs]
    stats = server.wait_idle()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["forked_seqs"] >= 4


def test_stream_stops_at_eos_like_the_offline_engine(server, offline):
    params = dict(temperature=0, max_tokens=300)
    prompts = list(SAFE_PROMPTS[2:5])
    refs = offline.generate(prompts, SamplingParams(**params))
    assert "stop" in {r.finish_reason for r in refs}  # the tiny model does reach EOS on some of these
    for prompt, ref in zip(prompts, refs):
        with httpx.stream("POST", server.url + "/generate_stream", json={"prompt": prompt, **params}, timeout=30) as r:
            events = list(sse_events(r))
        assert "".join(e["text"] for e in events) == ref.text
        assert events[-1]["finish_reason"] == ref.finish_reason
