"""Token ids to text, incrementally, without ever emitting half a character.

Decoding each new token alone is wrong twice over: byte-level tokens can
hold part of a multi-byte UTF-8 character, and sentencepiece tokenizers
decide a token's leading space from its neighbours. So each step decodes a
small window of recent tokens with and without the new ones and emits the
difference, holding text back while it ends in an incomplete character.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first output token: enough for
# a sentencepiece tokenizer to see that the first output token follows text.
_CONTEXT_TOKENS = 5


def _decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    # No clean-up: it rewrites " ," to "," depending on neighbouring tokens,
    # which would make the text depend on where the window starts.
    return tokenizer.decode(
        list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _context(tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool) -> list[int]:
    """The prompt tokens an output is decoded after (its last few), or none where the prompt ends inside a
    character: diffing against such a context would swallow that character."""
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    if context and _decode(tokenizer, context, skip_special_tokens).endswith(_REPLACEMENT_CHAR):
        return []
    return context


def decode_output(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True,
                  prompt_token_ids: Sequence[int] = ()) -> str:
    """Decode a finished output in one go (the non-streaming path): what it adds after the end of the
    prompt, so the text is the streamed one's. A sentencepiece tokenizer drops the leading space of the
    first token of a sequence: decoded alone, " and Tom" after "Lily" came back as "and Tom"."""
    context = _context(tokenizer, prompt_token_ids, skip_special_tokens)
    if not context:
        return _decode(tokenizer, ids, skip_special_tokens)
    head = _decode(tokenizer, context, skip_special_tokens)
    full = _decode(tokenizer, context + list(ids), skip_special_tokens)
    return full[len(head):] if full.startswith(head) else _decode(tokenizer, ids, skip_special_tokens)


def find_stop_string(text: str, stops: Sequence[str], start: int) -> Optional[tuple[int, str]]:
    """Earliest stop string in ``text`` that ends at or after ``start``.

    Only occurrences that begin at or after ``start - (len(stop) - 1)`` are
    considered, i.e. those that reach into the text from ``start`` on; earlier
    text was checked before. Returns ``(index where the stop string begins,
    stop string)`` or None. On a tie, the stop listed first wins.
    """
    best: Optional[tuple[int, str]] = None
    for stop in stops:
        if not stop:
            continue
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


class IncrementalDetokenizer:
    """Streams one request's output text as its tokens arrive.

    ``add_tokens`` returns only text that is final: no incomplete UTF-8
    character, and, when stop strings are given, nothing that could still turn
    out to be the beginning of one. After ``finish`` the concatenation of all
    returned deltas equals ``text``; without a stop string that is
    ``decode_output(tokenizer, output_ids, prompt_token_ids=...)``: for
    sentencepiece tokenizers the text keeps the leading space the first output
    token has after the prompt.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = [s for s in stop if s]
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = _context(tokenizer, prompt_token_ids, skip_special_tokens)
        # _ids[_prefix_offset:_read_offset] is the window already turned into
        # text; _ids[_read_offset:] is not yet.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._produced = ""  # all stable text, including what is held back
        self._emitted = 0  # len of the part of _produced handed out
        self.stop_hit: Optional[str] = None
        self._finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._produced[: self._emitted]

    def add_tokens(self, token_ids: list[int], check_stops: bool = True) -> str:
        """Take new output tokens; return the newly stable text ("" if none). ``check_stops`` False (before
        min_tokens): a stop string ending in this text does not stop the request (one that begins here and
        ends in a later, checked call still does)."""
        if self.stop_hit is not None:
            return ""
        if self._finished:
            raise RuntimeError("add_tokens called after finish()")
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._accept(new_text[len(prefix_text) :], final=False, check_stops=check_stops)

    def finish(self) -> str:
        """Flush held-back text (an incomplete character decodes as U+FFFD);
        return the final delta. Calling it again returns ""."""
        if self._finished or self.stop_hit is not None:
            self._finished = True
            return ""
        self._finished = True
        delta = ""
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset :])
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._accept(delta, final=True)

    def _accept(self, delta: str, final: bool, check_stops: bool = True) -> str:
        start = len(self._produced)
        self._produced += delta
        end = len(self._produced)
        if self._stops:
            found = find_stop_string(self._produced, self._stops, start) if check_stops else None
            if found is not None:
                cut, self.stop_hit = found
                self._produced = self._produced[:cut]
                end = cut
            elif not final:
                end = max(self._emitted, end - self._holdback)
        out = self._produced[self._emitted : end]
        self._emitted = end
        return out

    def _decode(self, ids: Sequence[int]) -> str:
        return _decode(self._tokenizer, ids, self._skip_special_tokens)
