"""Logprobs on the OpenAI routes: OpenAI's shapes (through the official client), the offline engine's values."""
from __future__ import annotations

import httpx
import openai
import pytest

from model_factory import SAFE_PROMPTS
from pagedbatch import SamplingParams
from pagedbatch.engine.token_bytes import TokenBytes
from pagedbatch.engine.tokenizer import encode_chat

GREEDY = dict(temperature=0, max_tokens=16, ignore_eos=True)
MESSAGES = [{"role": "user", "content": SAFE_PROMPTS[2]}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def token_bytes(offline):
    return TokenBytes(offline.tokenizer)


def _ref(offline, prompt, k):
    return offline.generate([prompt], SamplingParams(**GREEDY, logprobs=k))[0]


def test_completion_logprobs_name_each_token_with_its_logprob_and_alternatives(client, offline, token_bytes):
    ref = _ref(offline, SAFE_PROMPTS[0], 2)
    c = client.completions.create(model="tiny-llama", prompt=SAFE_PROMPTS[0], logprobs=2,
                                  extra_body={"ignore_eos": True}, temperature=0, max_tokens=16)
    lp = c.choices[0].logprobs
    assert lp.tokens == [token_bytes.text(t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for top, entry, token in zip(lp.top_logprobs, ref.logprobs, lp.tokens):
        # The 2 most likely and the chosen one (greedy: among them), as OpenAI documents: up to k + 1.
        want = {}
        for t, v in entry.top:  # tokens sharing a text (U+FFFD halves): the best's value, the chosen one's own
            want.setdefault(token_bytes.text(t), v)
        want[token] = entry.logprob
        assert top == pytest.approx(want, abs=1e-5)
        assert token in top and max(top.values()) == pytest.approx(top[token], abs=1e-6)


def test_completion_logprobs_0_still_gives_the_chosen_tokens(client, offline):
    ref = _ref(offline, SAFE_PROMPTS[1], 0)
    c = client.completions.create(model="tiny-llama", prompt=SAFE_PROMPTS[1], logprobs=0,
                                  extra_body={"ignore_eos": True}, temperature=0, max_tokens=16)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == ref.output_tokens == 16
    assert [list(d) for d in lp.top_logprobs] == [[t] for t in lp.tokens]


def test_streamed_completion_logprobs_join_to_the_unstreamed_ones(client):
    args = dict(model="tiny-llama", prompt=[SAFE_PROMPTS[3], SAFE_PROMPTS[4]], logprobs=1, temperature=0,
                max_tokens=16, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    joined = {0: ([], [], []), 1: ([], [], [])}
    for chunk in client.completions.create(stream=True, **args):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                tokens, lps, offsets = joined[ch.index]
                tokens += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    for ch in whole.choices:
        tokens, lps, offsets = joined[ch.index]
        assert tokens == ch.logprobs.tokens and offsets == ch.logprobs.text_offset
        assert lps == pytest.approx(ch.logprobs.token_logprobs, abs=1e-6)


def test_chat_logprobs_give_token_bytes_and_the_top_k(client, offline, token_bytes):
    ref = _ref(offline, encode_chat(offline.tokenizer, MESSAGES), 3)
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True}, temperature=0, max_tokens=16)
    content = c.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in content] == [token_bytes(t) for t in ref.token_ids]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == c.choices[0].message.content
    for e, r in zip(content, ref.logprobs):
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
        assert e.logprob == pytest.approx(r.logprob, abs=1e-5)
        assert [bytes(t.bytes) for t in e.top_logprobs] == [token_bytes(t) for t, _ in r.top]
        values = [t.logprob for t in e.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)


def test_chat_logprobs_without_top_logprobs_have_empty_alternatives(client):
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, logprobs=True, temperature=0,
                                       max_tokens=5, extra_body={"ignore_eos": True})
    assert [e.top_logprobs for e in c.choices[0].logprobs.content] == [[]] * 5


def test_streamed_chat_logprobs_join_to_the_unstreamed_ones_for_each_sample(client):
    args = dict(model="tiny-llama", messages=MESSAGES, logprobs=True, top_logprobs=2, temperature=0.8, seed=7,
                n=2, max_tokens=12, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    joined: dict[int, list] = {0: [], 1: []}
    for chunk in client.chat.completions.create(stream=True, **args):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                joined[ch.index] += ch.logprobs.content
    for ch in whole.choices:
        assert len(ch.logprobs.content) == 12
        assert [(e.token, e.bytes) for e in joined[ch.index]] == [(e.token, e.bytes) for e in ch.logprobs.content]


def test_no_logprobs_unless_asked(client):
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=3)
    assert c.choices[0].logprobs is None
    c = client.completions.create(model="tiny-llama", prompt=SAFE_PROMPTS[0], max_tokens=3)
    assert c.choices[0].logprobs is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
])
def test_logprobs_out_of_range_are_a_400_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, json={**body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
