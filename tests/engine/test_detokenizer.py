"""Incremental detokenization: streamed deltas add up to the decoded text,
never contain half a character and never leak part of a stop string."""
from __future__ import annotations

import random

import pytest

import model_factory
from pagedbatch.engine.detokenizer import IncrementalDetokenizer, decode_output, find_stop_string

CHINESE = "今天天气很好，我们去公园散步吧。大型语言模型可以生成文本、翻译语言和回答问题。"
EMOJI = "Emoji 🙂🚀✨ family 👨‍👩‍👧 flag 🇯🇵 skin 👍🏽 done"
MIXED = "Hello, 世界! café naïve — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and code: x = f(y) 🙂\n"


@pytest.fixture(scope="module")
def test_tokenizer(tmp_path_factory):
    return model_factory.build_tokenizer(tmp_path_factory.mktemp("detok-tokenizer"))


@pytest.fixture(scope="module")
def qwen2_tokenizer(shared_tokenizer):
    return shared_tokenizer("qwen2-tokenizer")


@pytest.fixture(scope="module")
def llama3_tokenizer(shared_tokenizer):
    return shared_tokenizer("llama3-tokenizer")


@pytest.fixture(scope="module")
def stories_tokenizer(shared_tokenizer):
    return shared_tokenizer("stories260k")


BYTE_LEVEL = ["test_tokenizer", "qwen2_tokenizer", "llama3_tokenizer"]
ALL = BYTE_LEVEL + ["stories_tokenizer"]


def stream(tokenizer, prompt_ids, output_ids, *, stop=(), chunk=1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens, stop=stop)
    deltas = []
    for i in range(0, len(output_ids), chunk):
        deltas.append(detok.add_tokens(output_ids[i : i + chunk]))
        assert "".join(deltas) == detok.text
    deltas.append(detok.finish())
    assert "".join(deltas) == detok.text
    return detok, deltas


def text_after_prompt(tokenizer, prompt_ids, output_ids):
    """What the output adds to the decoded prompt (keeps a sentencepiece
    tokenizer's leading space, which decoding the output alone strips)."""
    prompt_text = decode_output(tokenizer, prompt_ids)
    full = decode_output(tokenizer, prompt_ids + output_ids)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


@pytest.mark.parametrize("tok_name", ALL)
@pytest.mark.parametrize("text", [CHINESE, EMOJI, MIXED], ids=["chinese", "emoji", "mixed"])
def test_streamed_text_equals_decoded_text_without_replacement_chars(request, tok_name, text):
    tok = request.getfixturevalue(tok_name)
    prompt_ids = tok("Answer in Chinese:").input_ids
    output_ids = tok(text, add_special_tokens=False).input_ids
    assert len(output_ids) > 10

    for chunk in (1, 3):
        detok, deltas = stream(tok, prompt_ids, output_ids, chunk=chunk)
        assert not any("\ufffd" in d for d in deltas)
        assert detok.text == text_after_prompt(tok, prompt_ids, output_ids)
        if tok_name in BYTE_LEVEL:
            assert detok.text == decode_output(tok, output_ids) == text
        else:
            assert detok.text.lstrip(" ") == decode_output(tok, output_ids) == text

    # With no prompt at all the text is exactly the output decoded alone.
    detok, deltas = stream(tok, [], output_ids)
    assert detok.text == decode_output(tok, output_ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("tok_name", ALL)
def test_decoding_a_finished_output_with_its_prompt_gives_the_streamed_text(request, tok_name):
    # The non-streaming path decodes once; it decoded the output alone, so a sentencepiece output lost the
    # leading space the streamed text (and vLLM's) keeps: "and Tom were" against " and Tom were".
    tok = request.getfixturevalue(tok_name)
    prompt_ids = tok("Once upon a time").input_ids
    for text in (" there was a girl", MIXED, CHINESE):
        output_ids = tok(text, add_special_tokens=False).input_ids
        detok, _ = stream(tok, prompt_ids, output_ids)
        assert decode_output(tok, output_ids, prompt_token_ids=prompt_ids) == detok.text
    assert decode_output(tok, output_ids) == decode_output(tok, output_ids, prompt_token_ids=[])


def test_sentencepiece_output_keeps_its_leading_space_after_the_prompt(stories_tokenizer):
    tok = stories_tokenizer
    prompt_ids = tok("Once upon a time").input_ids
    output_ids = tok(" there was a girl", add_special_tokens=False).input_ids[1:]  # drop the dummy prefix
    detok, deltas = stream(tok, prompt_ids, output_ids)
    assert detok.text == " there was a girl"
    assert deltas[0] == " there"


@pytest.mark.parametrize("tok_name", ALL)
def test_stop_string_across_token_boundaries_is_cut_and_never_partially_emitted(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    text = "今天天气很好，我们去公园散步吧。STOP after"
    output_ids = tok(text, add_special_tokens=False).input_ids
    for stop in ("公园散步", "吧。ST", "STOP", "步吧"):
        detok = IncrementalDetokenizer(tok, [], stop=[stop, "never appears"])
        emitted = ""
        for i, token in enumerate(output_ids):
            emitted += detok.add_tokens([token])
            assert stop not in emitted
            assert text.startswith(emitted)
            assert text.index(stop) >= len(emitted)  # nothing of the stop string leaked
            if detok.stop_hit:
                break
        assert detok.stop_hit == stop
        # more tokens and finish() are no-ops once stopped
        assert detok.add_tokens(output_ids[i + 1 :]) == ""
        emitted += detok.finish()
        assert emitted == detok.text == text[: text.index(stop)]


def test_stop_prefix_that_never_completes_is_released_at_finish(test_tokenizer):
    tok = test_tokenizer
    text = "ST STO STOP!"
    ids = tok(text, add_special_tokens=False).input_ids
    detok, deltas = stream(tok, [], ids, stop=["STOP?"])
    assert detok.stop_hit is None
    assert detok.text == text
    assert not deltas[-2].endswith("STOP!") and deltas[-1]  # the tail came out only at finish


def test_earliest_stop_string_wins(test_tokenizer):
    tok = test_tokenizer
    ids = tok("one two three four", add_special_tokens=False).input_ids
    detok, _ = stream(tok, [], ids, stop=["four", "two", "tw"], chunk=len(ids))
    assert detok.stop_hit == "two"
    assert detok.text == "one "


def byte_token_ids(tokenizer) -> list[int]:
    """Ids of the single-byte tokens (byte-level alphabet or <0xNN> fallback)."""
    vocab = tokenizer.get_vocab()
    fallback = [vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab]
    if fallback:
        return fallback
    return sorted(i for t, i in vocab.items() if len(t) == 1 and i not in tokenizer.all_special_ids)


@pytest.mark.parametrize("tok_name", ALL)
def test_random_token_ids_never_crash_and_deltas_add_up(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    rng = random.Random(1234)
    byte_ids = byte_token_ids(tok)
    assert len(byte_ids) == 256
    saw_invalid_utf8 = False
    for trial in range(16):
        # odd trials: single bytes only, mostly invalid or incomplete UTF-8
        pool = byte_ids if trial % 2 else range(len(tok))
        prompt_ids = [rng.choice(pool) for _ in range(rng.randrange(0, 8))]
        output_ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        skip = bool(trial % 3)
        stop = ["ab", "\u00e9"] if trial % 4 == 3 else ()
        detok, deltas = stream(
            tok, prompt_ids, output_ids, chunk=rng.choice([1, 2, 5]), stop=stop, skip_special_tokens=skip
        )
        saw_invalid_utf8 |= "\ufffd" in detok.text
        if stop or tok_name not in BYTE_LEVEL:
            continue
        context = prompt_ids[-5:]
        if decode_output(tok, context, skip).endswith("\ufffd"):
            # a prompt ending inside a character is not used as context
            assert detok.text == decode_output(tok, output_ids, skip)
        else:
            assert detok.text == text_after_prompt_skip(tok, context, output_ids, skip)
    assert saw_invalid_utf8


def text_after_prompt_skip(tokenizer, prompt_ids, output_ids, skip):
    prompt_text = decode_output(tokenizer, prompt_ids, skip)
    return decode_output(tokenizer, prompt_ids + output_ids, skip)[len(prompt_text) :]


def test_find_stop_string():
    assert find_stop_string("hello world", ["wor"], 0) == (6, "wor")
    assert find_stop_string("hello world", ["wor"], 8) == (6, "wor")  # ends inside the new text
    assert find_stop_string("hello world", ["wor"], 9) is None  # already checked before
    assert find_stop_string("hello world", ["o w", "llo"], 0) == (2, "llo")
    assert find_stop_string("abc", [], 0) is None
    assert find_stop_string("abcabc", ["c", "bc"], 4) == (4, "bc")
