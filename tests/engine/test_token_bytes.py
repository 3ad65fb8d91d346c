"""Each token's own bytes (the OpenAI logprobs' ``token``/``bytes``): a text's tokens spell exactly its bytes."""
from __future__ import annotations

import pytest

import model_factory
from pagedbatch.engine.token_bytes import TokenBytes
from pagedbatch.engine.tokenizer import load_tokenizer
from test_qwen_v1 import write_tiny_tiktoken

TEXTS = ["Hello, 世界! café naïve — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂\n", "今天天气很好，我们去公园散步吧。", "def f(x):\n\treturn x * 2  # spaced   out",
         "Emoji 👨‍👩‍👧 flag 🇯🇵 skin 👍🏽"]


def _spelled(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return b"".join(TokenBytes(tokenizer)(i) for i in ids), ids


def test_test_tokenizers_byte_level_tokens_spell_the_text(tmp_path):
    tok = model_factory.build_tokenizer(tmp_path)
    for text in TEXTS:
        spelled, ids = _spelled(tok, text)
        assert spelled == text.encode()
    # Some token of a multi-byte character holds only part of it: its text is U+FFFD, its bytes exact.
    tb = TokenBytes(tok)
    partial = [i for text in TEXTS for i in tok(text, add_special_tokens=False)["input_ids"]
               if "\ufffd" in tb.text(i)]
    assert partial and all(tb(i) and tb(i).decode("utf-8", errors="replace") == tb.text(i) for i in partial)


@pytest.mark.parametrize("name", ["qwen2-tokenizer", "llama3-tokenizer"])
def test_real_byte_level_tokenizers_spell_the_text(shared_tokenizer, name):
    tok = shared_tokenizer(name)
    for text in TEXTS:
        assert _spelled(tok, text)[0] == text.encode()


def test_sentencepiece_tokens_keep_their_leading_space_and_byte_fallback(shared_tokenizer):
    tok = shared_tokenizer("stories260k")
    for text in TEXTS:
        # Sentencepiece prefixes the text with a space (its "dummy prefix"); the first token carries it.
        assert _spelled(tok, text)[0] == b" " + text.encode()
    tb = TokenBytes(tok)
    byte_token = tok.convert_tokens_to_ids("<0xE4>")
    assert tb(byte_token) == b"\xe4" and tb.text(byte_token) == "\ufffd"


def test_added_tokens_are_their_text_and_ids_past_the_vocabulary_are_empty(shared_tokenizer):
    tok = shared_tokenizer("qwen2-tokenizer")
    tb = TokenBytes(tok)
    assert tb(tok.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    assert tb(len(tok) + 10) == b""


def test_preloading_gives_the_same_bytes_as_looking_up(tmp_path):
    tok = model_factory.build_tokenizer(tmp_path)
    lazy, eager = TokenBytes(tok), TokenBytes(tok).preload()
    assert [eager(i) for i in range(len(tok))] == [lazy(i) for i in range(len(tok))]
    assert eager(len(tok)) == b""


def test_qwen_v1_tiktoken_tokens_are_their_vocabulary_bytes(tmp_path):
    write_tiny_tiktoken(tmp_path / "qwen.tiktoken")
    tok = load_tokenizer(str(tmp_path))
    tb = TokenBytes(tok).preload()
    for text in TEXTS:
        assert b"".join(tb(i) for i in tok.encode(text)) == text.encode()
    assert tb(tok.im_end_id) == b"<|im_end|>" and tb(len(tok)) == b""
