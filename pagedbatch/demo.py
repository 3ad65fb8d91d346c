"""The built-in demo model, for trying pagedbatch with no model at hand.

A tiny Llama with random weights and a pure byte-level tokenizer (any UTF-8
text round-trips). It is built once, deterministically, into a cache folder;
its output is meaningless text.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_NOTICE = (
    "Using the built-in demo model: it has random weights, so its text is meaningless. "
    "Use --model /path/to/hf-model-dir for a real Hugging Face model."
)

_DEMO_NAME = "demo-model-v1"
_HIDDEN = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_INTERMEDIATE = 256
_MAX_POSITIONS = 2048
_NUM_BYTES = 256
_BOS, _EOS, _PAD = _NUM_BYTES, _NUM_BYTES + 1, _NUM_BYTES + 2  # 256, 257, 258
_VOCAB = 320  # 259 tokens padded up to a multiple of 64
_SEED = 0

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _cache_root() -> Path:
    env = os.environ.get("PAGEDBATCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pagedbatch"


def demo_model_dir() -> str:
    """Return the demo model's directory, building it on first use.

    Lives in ``$PAGEDBATCH_CACHE_DIR/demo-model-v1`` (default
    ``~/.cache/pagedbatch/demo-model-v1``). Safe against concurrent builders:
    each writes a private temporary folder and renames it into place.
    """
    root = _cache_root()
    final = root / _DEMO_NAME
    if (final / "config.json").exists():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DEMO_NAME}-", dir=root))
    try:
        _write_demo_model(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race; its copy is identical.
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _write_demo_model(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(_SEED)
    head_dim = _HIDDEN // _HEADS

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).contiguous()

    tensors = {"model.embed_tokens.weight": normal(_VOCAB, _HIDDEN, std=0.4)}
    for i in range(_LAYERS):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(_HEADS * head_dim, _HIDDEN, std=0.1)
        tensors[p + "self_attn.k_proj.weight"] = normal(_KV_HEADS * head_dim, _HIDDEN, std=0.1)
        tensors[p + "self_attn.v_proj.weight"] = normal(_KV_HEADS * head_dim, _HIDDEN, std=0.1)
        tensors[p + "self_attn.o_proj.weight"] = normal(_HIDDEN, _HEADS * head_dim, std=0.1)
        tensors[p + "mlp.gate_proj.weight"] = normal(_INTERMEDIATE, _HIDDEN, std=0.1)
        tensors[p + "mlp.up_proj.weight"] = normal(_INTERMEDIATE, _HIDDEN, std=0.1)
        tensors[p + "mlp.down_proj.weight"] = normal(_HIDDEN, _INTERMEDIATE, std=0.1)
        tensors[p + "input_layernorm.weight"] = 1.0 + normal(_HIDDEN, std=0.1)
        tensors[p + "post_attention_layernorm.weight"] = 1.0 + normal(_HIDDEN, std=0.1)
    tensors["model.norm.weight"] = 1.0 + normal(_HIDDEN, std=0.1)
    lm_head = normal(_VOCAB, _HIDDEN, std=0.2)
    lm_head[_PAD + 1:] *= 0.01  # padding rows: never the argmax
    tensors["lm_head.weight"] = lm_head
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "head_dim": head_dim,
        "intermediate_size": _INTERMEDIATE,
        "hidden_act": "silu",
        "max_position_embeddings": _MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": _VOCAB,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "pad_token_id": _PAD,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": _BOS, "eos_token_id": _EOS, "pad_token_id": _PAD, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    _write_byte_tokenizer(out)


def _write_byte_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Id i is byte i, written in ByteLevel's printable alphabet; no merges.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(_NUM_BYTES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": _MAX_POSITIONS,
        "chat_template": _CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (what ByteLevel uses).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
