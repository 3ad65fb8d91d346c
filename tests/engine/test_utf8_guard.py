"""The UTF-8 guard agrees with a strict decoder, and its masks hold exactly the tokens that continue each state."""
from __future__ import annotations

import itertools

import torch

from pagedbatch.engine.utf8_guard import STATES, Utf8Guard, advance

# Every class of byte: ASCII, continuation sub-ranges, overlong and surrogate leads, out-of-range leads.
BYTES = [0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF, 0xF0, 0xF1,
         0xF4, 0xF5, 0xFF]


def _strict_prefix_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"  # valid so far, a character still open


def test_advance_accepts_exactly_the_valid_utf8_prefixes():
    for n in (1, 2, 3):
        for combo in itertools.product(BYTES, repeat=n):
            data = bytes(combo)
            assert (advance(0, data) >= 0) == _strict_prefix_ok(data), data


def test_state_masks_allow_exactly_the_valid_continuations():
    vocab = [b"</s>", b"a", b"\x80", b"\x81", b"\x9f", b"\xa0", b"\xbf", b"\xe6\x97\xa5", b"\xf0", b"\xed", b"\x90a"]
    guard = Utf8Guard(vocab, special={0}, vocab_size=40)  # rows past the vocabulary: padding
    assert guard.masks.shape == (len(STATES), 2) and not guard.check_boundary
    bits = ((guard.masks[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(len(STATES), -1)[:, :40]
    for s in range(1, len(STATES)):
        for t, data in enumerate(vocab):
            assert bool(bits[s, t]) == (t == 0 or advance(s, data) >= 0), (STATES[s], data)
    after_f0 = guard.next_state(0, vocab.index(b"\xf0"))
    assert STATES[after_f0] == (3, 0x90, 0xBF) and guard.next_state(after_f0, vocab.index(b"\x81")) == -1
    assert guard.next_state(after_f0, 0) == after_f0  # EOS and other special tokens move nothing
