"""Keeping grammar-constrained text valid UTF-8 where xgrammar's masks are lenient.

xgrammar 0.2.9 decodes multi-byte characters leniently on some paths: a JSON
schema ``pattern`` accepts overlong forms (``F0 81 B7 99``), and every path
accepts UTF-16 surrogates (``ED A0 80``). A model that writes byte tokens can
then produce text that is not UTF-8, so not the JSON it was held to. A
character boundary never needs more than xgrammar gives; the lenient cases
all sit right after a token that ended inside a character. So each
constrained sequence carries its UTF-8 state (how many continuation bytes
are due and the range the next must fall in: 8 states), and a row that is
mid-character has its bitmask ANDed with that state's precomputed mask of
tokens that continue it validly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# (continuation bytes due, allowed range of the next byte); state 0 is a character boundary.
STATES = ((0, 0x80, 0xBF), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F),
          (3, 0x80, 0xBF), (3, 0x90, 0xBF), (3, 0x80, 0x8F))
_INDEX = {s: i for i, s in enumerate(STATES)}


def _lead(b: int) -> Optional[tuple[int, int, int]]:
    """The state after lead byte ``b`` (strict RFC 3629: no overlongs, surrogates or code points past U+10FFFF)."""
    if b < 0x80:
        return STATES[0]
    if 0xC2 <= b <= 0xDF:
        return (1, 0x80, 0xBF)
    if b == 0xE0:
        return (2, 0xA0, 0xBF)
    if b == 0xED:
        return (2, 0x80, 0x9F)
    if 0xE1 <= b <= 0xEF:
        return (2, 0x80, 0xBF)
    if b == 0xF0:
        return (3, 0x90, 0xBF)
    if 0xF1 <= b <= 0xF3:
        return (3, 0x80, 0xBF)
    if b == 0xF4:
        return (3, 0x80, 0x8F)
    return None


def advance(state: int, data: bytes) -> int:
    """The state after ``data`` from ``state``; -1 if ``data`` is not a valid continuation."""
    need, lo, hi = STATES[state]
    for b in data:
        if need:
            if not lo <= b <= hi:
                return -1
            need, lo, hi = need - 1, 0x80, 0xBF
        else:
            nxt = _lead(b)
            if nxt is None:
                return -1
            need, lo, hi = nxt
    return _INDEX[(need, lo, hi) if need else STATES[0]]


class Utf8Guard:
    """Per-state token masks over a vocabulary of decoded token bytes.

    ``token_bytes[t]``: token t's bytes (xgrammar's decoded vocabulary);
    ``special``: ids whose bytes are not text (EOS, padding rows): left to
    xgrammar, allowed in every state.
    """

    def __init__(self, token_bytes: list[bytes], special: set[int], vocab_size: int):
        self.token_bytes = token_bytes
        self.special = special
        allowed = np.ones((len(STATES), vocab_size), dtype=bool)
        inner_break = False  # some token starts a character well but breaks inside
        for t, data in enumerate(token_bytes[:vocab_size]):
            if t in special or not data:
                continue
            if data.isascii():
                allowed[1:, t] = False  # continues no character
                continue
            for s in range(len(STATES)):
                allowed[s, t] = advance(s, data) >= 0
            inner_break |= not allowed[0, t] and _lead(data[0]) is not None
        # At a character boundary xgrammar refuses a bad first byte itself, so state 0
        # needs the mask only for a vocabulary with tokens that break inside.
        self.check_boundary = inner_break
        words = -(-vocab_size // 32)
        padded = np.zeros((len(STATES), words * 32), dtype=bool)
        padded[:, :vocab_size] = allowed
        # Bit t of word t // 32, lowest bit first: xgrammar's int32 bitmask layout (little-endian).
        packed = np.packbits(padded, axis=1, bitorder="little").view("<i4").astype(np.int32)
        self.masks = torch.from_numpy(packed.reshape(len(STATES), words))  # [8, W] int32

    def next_state(self, state: int, token: int) -> int:
        if token in self.special or token >= len(self.token_bytes):
            return state
        return advance(state, self.token_bytes[token])
