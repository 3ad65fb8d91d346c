"""The official openai client, unchanged, against the server: completions and chat, streaming and not."""
from __future__ import annotations

import httpx
import openai
import pytest

from model_factory import SAFE_PROMPTS
from pagedbatch import SamplingParams
from pagedbatch.engine.tokenizer import encode_chat

GREEDY = dict(temperature=0, max_tokens=20)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SAFE_PROMPTS[3]}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def chat_ref(offline):
    return offline.generate([encode_chat(offline.tokenizer, MESSAGES)], SamplingParams(**GREEDY))[0]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]


def test_completion_equals_offline_greedy(client, offline):
    ref = offline.generate([SAFE_PROMPTS[0]], SamplingParams(**GREEDY))[0]
    c = client.completions.create(model="tiny-llama", prompt=SAFE_PROMPTS[0], **GREEDY)
    assert c.object == "text_completion" and c.model == "tiny-llama"
    assert c.choices[0].text == ref.text
    assert c.choices[0].finish_reason == ref.finish_reason
    assert c.usage.prompt_tokens == ref.prompt_tokens and c.usage.completion_tokens == ref.output_tokens


def test_completion_of_several_prompts_gives_one_choice_each_in_order(client, offline):
    prompts = list(SAFE_PROMPTS[:3])
    refs = offline.generate(prompts, SamplingParams(**GREEDY))
    c = client.completions.create(model="tiny-llama", prompt=prompts, **GREEDY)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert [ch.text for ch in c.choices] == [r.text for r in refs]


def test_streamed_completion_joins_to_the_offline_text(client, offline):
    ref = offline.generate([SAFE_PROMPTS[1]], SamplingParams(**GREEDY))[0]
    stream = client.completions.create(model="tiny-llama", prompt=SAFE_PROMPTS[1], stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.text
    assert len([ch for ch in chunks if ch.choices]) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == ref.output_tokens


def test_chat_completion_equals_offline_greedy_over_the_chat_template(client, chat_ref):
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, **GREEDY)
    assert c.object == "chat.completion"
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == chat_ref.text
    assert c.choices[0].finish_reason == chat_ref.finish_reason
    assert c.usage.prompt_tokens == chat_ref.prompt_tokens


def test_streamed_chat_completion_joins_to_the_offline_text(client, chat_ref):
    stream = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat_ref.text
    assert chunks[-1].choices[0].finish_reason == chat_ref.finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


SAMPLED = dict(temperature=1.0, seed=21, max_tokens=12)


def test_n_gives_n_choices_per_prompt_prompt_major_streaming_or_not(client, offline):
    prompts = list(SAFE_PROMPTS[:2])
    refs = offline.generate(prompts, SamplingParams(n=2, **SAMPLED))
    c = client.completions.create(model="tiny-llama", prompt=prompts, n=2, **SAMPLED)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in c.choices] == [r.text for r in refs]
    assert refs[0].token_ids != refs[1].token_ids  # two samples, not one answer twice
    assert c.usage.prompt_tokens == refs[0].prompt_tokens + refs[2].prompt_tokens  # each prompt counted once
    assert c.usage.completion_tokens == sum(r.output_tokens for r in refs)
    texts = ["", "", "", ""]
    for chunk in client.completions.create(model="tiny-llama", prompt=prompts, n=2, stream=True, **SAMPLED):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == [r.text for r in refs]


def test_chat_with_n_gives_n_choices_streaming_or_not(client, offline):
    refs = offline.generate([encode_chat(offline.tokenizer, MESSAGES)], SamplingParams(n=2, **SAMPLED))
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, n=2, **SAMPLED)
    assert [(ch.index, ch.message.content) for ch in c.choices] == [(0, refs[0].text), (1, refs[1].text)]
    roles, texts, reasons = {}, ["", ""], [None, None]
    for chunk in client.chat.completions.create(model="tiny-llama", messages=MESSAGES, n=2, stream=True, **SAMPLED):
        ch = chunk.choices[0]
        roles.setdefault(ch.index, ch.delta.role)  # the first chunk of each choice names the role
        texts[ch.index] += ch.delta.content or ""
        reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == [r.text for r in refs] and reasons == [r.finish_reason for r in refs]


def test_max_completion_tokens_bounds_a_chat_answer(client, chat_ref):
    c = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, temperature=0,
                                       max_completion_tokens=7)
    assert c.usage.completion_tokens == min(7, chat_ref.output_tokens)


def test_client_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"


def test_curl_style_form_encoded_json_is_accepted(server):
    # `curl -d '{...}'` sends Content-Type application/x-www-form-urlencoded; the body is still JSON.
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 3}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
