"""Each token's own bytes, for logprobs that name their tokens (OpenAI's ``token`` and ``bytes``).

Decoding one token alone is wrong here twice over: a byte-level token may hold
part of a UTF-8 character (it decodes to U+FFFD), and a sentencepiece
tokenizer drops a lone token's leading space. The vocabulary's piece is exact
once read by the tokenizer's own decoder rules: byte-level pieces spell bytes
in GPT-2's printable alphabet, sentencepiece pieces write a space as U+2581
and a byte the vocabulary lacks as ``<0xAB>``. Added tokens (``<|im_end|>``)
are their text.
"""
from __future__ import annotations

import json
import re
from typing import Any

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted (the table every byte-level BPE vocabulary uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type``s in a fast tokenizer's decoder (nested sequences included); empty where there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    try:
        spec = json.loads(backend.decoder.__getstate__())  # the decoder alone, not the whole vocabulary
    except Exception:
        return set()
    found: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class TokenBytes:
    """``token_bytes(token_id) -> bytes``, cached; an id past the vocabulary is ``b""``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._own = getattr(tokenizer, "token_bytes", None)  # tokenizers of our own (Qwen v1's tiktoken) know them
        types = _decoder_types(tokenizer)
        self._byte_level = "ByteLevel" in types
        self._byte_fallback = "ByteFallback" in types
        # Sentencepiece writes a space as U+2581 (Metaspace, or Replace in Llama 2's tokenizer.json).
        self._metaspace = bool(types & {"Metaspace", "Replace"}) or not types
        self._added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}
        self._cache: dict[int, bytes] = {}
        self._complete = False  # preloaded: an id not in the cache is past the vocabulary

    def preload(self) -> "TokenBytes":
        """Look every token up now, so that later calls never touch the tokenizer (the server's engine thread
        owns it)."""
        n = len(self.tokenizer)
        if self._own is None:
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(n)))
            for i, piece in enumerate(pieces):
                self._cache[i] = self._from_piece(i, piece)
        else:
            for i in range(n):
                self._cache[i] = self._own(i)
        self._complete = True
        return self

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            if self._complete:
                return b""
            cached = self._cache[token_id] = self._lookup(token_id)
        return cached

    def _lookup(self, token_id: int) -> bytes:
        if self._own is not None:
            return self._own(token_id)
        try:
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        except Exception:
            piece = None
        return self._from_piece(token_id, piece)

    def _from_piece(self, token_id: int, piece: Any) -> bytes:
        if not isinstance(piece, str):
            return b""
        if token_id in self._added:
            return piece.encode("utf-8")
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        match = _BYTE_PIECE.match(piece)
        if match and (self._byte_fallback or not self._byte_level):
            return bytes([int(match.group(1), 16)])
        if self._metaspace:
            piece = piece.replace(_SPIECE_SPACE, " ")
        return piece.encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token as text: its bytes decoded, a part of a character as U+FFFD (``bytes`` holds the truth)."""
        return self(token_id).decode("utf-8", errors="replace")
