"""OpenAI's logprobs objects, for the server's OpenAI routes and OpenAI batch output files.

Chat completions: ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}, ...]}, ...], "refusal": null}`` with the k most
likely tokens per position. Text completions (the legacy shape): ``{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}, ...], "text_offset"}``,
where each position's dict holds the k most likely tokens and the chosen one
(so up to k + 1 entries, as OpenAI documents; tokens whose texts are equal share one
entry: the chosen token's logprob where it is one of them, else the best). Token texts come from each
token's own bytes (engine/token_bytes.py); part of a character reads U+FFFD
there and ``bytes`` keeps the truth. Logprobs are those of the model's raw
distribution, as the engine reports them everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .engine.outputs import TokenLogprob
from .engine.token_bytes import TokenBytes

# JSON has no -inf; OpenAI and vLLM send this floor instead.
LOGPROB_FLOOR = -9999.0


def _lp(value: float) -> float:
    value = float(value)
    return value if value > LOGPROB_FLOOR and not math.isinf(value) else LOGPROB_FLOOR


def _chat_token(token_id: int, logprob: float, token_bytes: TokenBytes) -> dict[str, Any]:
    raw = token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": _lp(logprob), "bytes": list(raw)}


def chat_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes) -> dict[str, Any]:
    """A chat choice's ``logprobs`` (or one chunk's: the entries of the tokens it carries)."""
    content = []
    for e in entries:
        item = _chat_token(e.token_id, e.logprob, token_bytes)
        item["top_logprobs"] = [_chat_token(t, lp, token_bytes) for t, lp in e.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes,
                        text_offset: int = 0) -> tuple[dict[str, Any], int]:
    """A text completion choice's ``logprobs`` and the text offset after it (a stream passes it to the next
    chunk). Offsets count characters of the token texts from ``text_offset``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for e in entries:
        text = token_bytes.text(e.token_id)
        tokens.append(text)
        token_logprobs.append(_lp(e.logprob))
        # Tokens can share a text (two halves of characters both read U+FFFD; " a" as one token or two
        # pieces): a dict keeps one value per text. The best alternative's is kept, and the chosen token's
        # text always holds the chosen token's logprob, so it reads the same as token_logprobs.
        top: dict[str, float] = {}
        for t, lp in e.top:
            top.setdefault(token_bytes.text(t), _lp(lp))
        top[text] = _lp(e.logprob)
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": offsets}, text_offset)
