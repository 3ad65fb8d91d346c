"""OpenAI logprobs shapes built from the engine's entries, without a model (the routes are tested in tests/server)."""
from __future__ import annotations

from pagedbatch.engine.outputs import TokenLogprob
from pagedbatch.openai_logprobs import LOGPROB_FLOOR, completion_logprobs


class _Bytes:
    """Token ids to bytes: 1 and 2 are two halves of "é" (both read U+FFFD alone), 3 and 4 both spell " a"."""

    table = {1: b"\xc3", 2: b"\xa9", 3: b" a", 4: b" a", 5: b"b"}

    def __call__(self, token_id):
        return self.table[token_id]

    def text(self, token_id):
        return self(token_id).decode("utf-8", errors="replace")


def test_completion_top_logprobs_keep_the_chosen_tokens_logprob_when_texts_collide():
    entries = [TokenLogprob(2, -1.5, top=[(1, -0.5), (2, -1.5), (5, -2.0)]),  # chosen shares U+FFFD with a better one
               TokenLogprob(5, -0.1, top=[(3, -0.3), (4, -0.9), (5, -0.1)])]  # two alternatives share " a"
    lp, end = completion_logprobs(entries, _Bytes())
    assert lp["tokens"] == ["\ufffd", "b"]
    assert lp["token_logprobs"] == [-1.5, -0.1]
    assert lp["top_logprobs"][0] == {"\ufffd": -1.5, "b": -2.0}
    assert lp["top_logprobs"][1] == {" a": -0.3, "b": -0.1}  # the best of the two " a" tokens, not the last
    assert lp["text_offset"] == [0, 1] and end == 2


def test_completion_logprobs_floor_minus_infinity():
    lp, _ = completion_logprobs([TokenLogprob(5, float("-inf"), top=[(3, float("-inf"))])], _Bytes())
    assert lp["token_logprobs"] == [LOGPROB_FLOOR]
    assert lp["top_logprobs"] == [{" a": LOGPROB_FLOOR, "b": LOGPROB_FLOOR}]
