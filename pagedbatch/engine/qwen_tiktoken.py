"""The Qwen (v1) tokenizer: a ``qwen.tiktoken`` vocabulary file read by our own code.

Qwen v1 ships its tokenizer as Python in the model directory
(``tokenization_qwen.py``), which ``transformers`` would only run with
``trust_remote_code``. The format is simple enough to read here instead:
one ``<base64 token bytes> <rank>`` per line, byte-level BPE over Qwen's
split pattern, and special tokens numbered after the last rank
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` ...
``<|extra_204|>``; 151643 onwards in the real file).

The class offers the few tokenizer methods the engine uses (call, decode,
apply_chat_template, eos_token_id), so it stands in for a Hugging Face
tokenizer.
"""
from __future__ import annotations

import base64
import binascii
import os
import unicodedata
from typing import Any, Optional, Sequence

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NUM_EXTRA_TOKENS = 205
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS))
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def read_ranks(path: str) -> dict[bytes, int]:
    """Token bytes -> rank from a tiktoken vocabulary file; ValueError naming the bad line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected '<base64 token> <rank>'")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path} line {lineno}: {e}") from None
            if token in ranks:
                raise ValueError(f"{path} line {lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no tokens")
    return ranks


class QwenTiktokenTokenizer:
    """Qwen v1's tokenizer over a tiktoken vocabulary (see the module docstring)."""

    def __init__(self, ranks: dict[bytes, int], name: str = "qwen"):
        import tiktoken

        start = max(ranks.values()) + 1
        self.special_tokens = {tok: start + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.all_special_ids = sorted(self.special_tokens.values())
        self._special_start = start
        self.eos_token, self.eos_token_id = ENDOFTEXT, self.special_tokens[ENDOFTEXT]
        self.pad_token_id = self.eos_token_id
        self.bos_token_id = None
        self.im_start_id, self.im_end_id = self.special_tokens[IM_START], self.special_tokens[IM_END]
        # A chat turn ends with <|im_end|>, plain text with <|endoftext|>: both end a request.
        self.end_of_turn_token_ids = [self.im_end_id]
        # encode_chat checks for a template; ours is ChatML, built in code (apply_chat_template).
        self.chat_template = "chatml"

    @classmethod
    def from_dir(cls, path: str) -> "QwenTiktokenTokenizer":
        return cls(read_ranks(os.path.join(path, VOCAB_FILE)))

    def __len__(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # As Qwen's own tokenizer: NFC first, and special-token text in the input is that special token.
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of ``ids``; an incomplete UTF-8 character decodes to U+FFFD (the detokenizer relies on it).

        Ids past the vocabulary (padding rows of the embedding) decode to nothing.
        """
        n = self._enc.n_vocab
        ids = [i for i in ids if 0 <= i < n and not (skip_special_tokens and i >= self._special_start)]
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes (a special token's text); ``b""`` past the vocabulary."""
        if not 0 <= token_id < self._enc.n_vocab:
            return b""
        return self._enc.decode_single_token_bytes(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._enc.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT, **_: Any):
        """ChatML as Qwen-Chat was trained on it: a default system turn, roles and contents
        tokenized separately (so message text never turns into special tokens), turns joined by newlines."""
        nl = self.encode("\n")
        turns = list(messages)
        if system_prompt is not None and (not turns or turns[0].get("role") != "system"):
            turns.insert(0, {"role": "system", "content": system_prompt})
        ids: list[int] = []
        for i, m in enumerate(turns):
            if i:
                ids += nl
            ids += [self.im_start_id] + self.encode(str(m["role"]), False) + nl
            ids += self.encode(str(m.get("content") or ""), False) + [self.im_end_id]
        if add_generation_prompt:
            ids += nl + [self.im_start_id] + self.encode("assistant", False) + nl
        return ids if tokenize else self.decode(ids)
