"""Tokenizer loading and the few encode helpers the engine and jobs share."""
from __future__ import annotations

import json
import os
from typing import Any, Union


def load_tokenizer(path: str):
    from .qwen_tiktoken import VOCAB_FILE, QwenTiktokenTokenizer

    if os.path.isfile(os.path.join(path, VOCAB_FILE)):
        # Qwen (v1): transformers would need the directory's own code (trust_remote_code).
        return QwenTiktokenTokenizer.from_dir(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ValueError(f"could not load a tokenizer from {path!r}: {type(e).__name__}: {e}") from e


def eos_token_ids(model_dir: str, tokenizer, config_eos: list[int]) -> set[int]:
    """The ids that end a request (unless ``ignore_eos``): the union of config.json's ``eos_token_id``,
    generation_config.json's and the tokenizer's ``eos_token``.

    Not what Hugging Face ``generate`` does: it stops only on generation_config's ids (filled from
    config.json when that file is absent), so where the tokenizer or config.json names an id that
    generation_config does not, we stop on it and transformers runs on. We take the union, as vLLM adds
    generation_config's ids to the tokenizer's, so that a model whose files disagree (a chat model whose
    config.json names only ``<|endoftext|>``) still ends at its end of turn.
    """
    ids: set[int] = set(config_eos)
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # Qwen v1's tiktoken tokenizer: <|im_end|> ends a chat turn, but its generation_config names only <|endoftext|>.
    ids.update(getattr(tokenizer, "end_of_turn_token_ids", ()))
    return ids


def prompt_token_ids(tokenizer, vocab_size: int, prompt: Union[str, list[int]]) -> list[int]:
    """Token ids for a prompt (text, or ids checked against the vocabulary);
    ValueError for an empty one. Needs no model, so a job's data-parallel
    parent validates rows with the tokenizer alone."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set): give token ids")
        if not prompt:
            raise ValueError("prompt is empty")
        ids = encode_prompt(tokenizer, prompt)
        beyond = sorted({t for t in ids if t >= vocab_size})
        if beyond:
            raise ValueError(f"the tokenizer encodes this text to token ids {beyond[:5]} past the model's vocabulary "
                             f"of {vocab_size}: is it this model's tokenizer?")
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt token ids are empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt encodes to zero tokens")
    return ids


def check_unicode(text: str, what: str = "prompt") -> None:
    """ValueError for text no tokenizer can encode: a lone UTF-16 surrogate (JSON's "\\ud83d" without its pair,
    or a Python string built from one), which the tokenizers library refuses with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: it holds a lone surrogate {text[e.start]!r} at character "
                         f"{e.start} (half of a UTF-16 pair; a JSON escape such as \\ud83d needs its partner)") from None


def encode_prompt(tokenizer, text: str) -> list[int]:
    check_unicode(text)
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Render chat messages with the tokenizer's chat template and tokenize them."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so 'messages' cannot be used; give a 'prompt' instead")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)
