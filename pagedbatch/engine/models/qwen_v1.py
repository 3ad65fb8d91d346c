"""Qwen (v1) checkpoints (``QWenLMHeadModel``, e.g. Qwen-7B-Chat) on our Llama-family model.

Qwen v1 is a Llama-shaped decoder under other names: a fused ``c_attn``
(q, k and v stacked, with bias), ``c_proj`` out of attention, a SwiGLU MLP
whose *gate* is ``w2`` and whose *up* projection is ``w1``
(``c_proj(w1(x) * silu(w2(x)))``), RMSNorm, rotate-half rotary and full
multi-head attention. So the model is ``LlamaForCausalLM`` with q/k/v bias;
this module translates the config and renames the tensors, and the model
directory's own Python code is never imported or run.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from .config import ModelArgs

ARCHITECTURE = "QWenLMHeadModel"

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
# Qwen v1 layer suffix -> the Llama-style suffix the loader already knows.
_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def is_qwen_v1(cfg: dict[str, Any]) -> bool:
    return ARCHITECTURE in (cfg.get("architectures") or []) or cfg.get("model_type") == "qwen"


def qwen_v1_model_args(cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs for a Qwen v1 ``config.json``; ValueError for variants our model cannot represent."""
    try:
        hidden = cfg["hidden_size"]
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        vocab = cfg["vocab_size"]
        intermediate = cfg["intermediate_size"]
    except KeyError as e:
        raise ValueError(f"Qwen (v1) config {source} lacks {e.args[0]!r}") from None
    head_dim = cfg.get("kv_channels") or hidden // num_heads
    if head_dim * num_heads != hidden:
        # c_proj is stored as Linear(hidden, projection): only square when they agree.
        raise ValueError(f"{source}: kv_channels ({head_dim}) x num_attention_heads ({num_heads}) must equal "
                         f"hidden_size ({hidden}) for Qwen (v1) checkpoints")
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(f"{source}: rotary_pct {cfg['rotary_pct']} is not supported (only 1.0, rotary on every dim)")
    if cfg.get("no_bias", True) is False:
        raise ValueError(f"{source}: no_bias=false (biases on c_proj and the MLP) is not supported")
    if intermediate % 2:
        raise ValueError(f"{source}: intermediate_size {intermediate} must be even (it counts w1 and w2 together)")
    # Past seq_length Qwen v1 switches on dynamic NTK rope scaling and log-n
    # attention scaling, which we do not implement; up to it both are the
    # identity, so the engine is exact there and stops there.
    seq_length = cfg.get("seq_length") or cfg.get("max_position_embeddings") or 2048
    eos = cfg.get("eos_token_id")
    return ModelArgs(
        architecture=ARCHITECTURE,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate // 2,  # Qwen v1 counts w1 and w2 together
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        max_position_embeddings=seq_length,
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True,
        torch_dtype=cfg.get("torch_dtype") or _dtype_from_flags(cfg),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        bos_token_id=cfg.get("bos_token_id"),
    )


def _dtype_from_flags(cfg: dict[str, Any]):
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if cfg.get(flag):
            return dtype
    return None


def rename_tensors(tensors: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Qwen v1 checkpoint tensors (the loader's unread ``TensorSource``s) under the Llama/Qwen2 names it maps.

    ``c_attn`` is split into q, k and v thirds (row windows, nothing read), so
    a tensor-parallel rank reads only its heads of each. Names with no
    counterpart (rotary buffers) pass through and the loader ignores them.
    """
    for name, tensor in tensors:
        if name in _TOP_NAMES:
            yield _TOP_NAMES[name], tensor
            continue
        m = _LAYER.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, suffix = f"model.layers.{m.group(1)}.", m.group(2)
        if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = suffix.rsplit(".", 1)[1]
            if tensor.shape[0] % 3:
                raise ValueError(f"{name} has {tensor.shape[0]} rows, not three equal q/k/v parts")
            n = tensor.shape[0] // 3
            q, k, v = (tensor.rows(i * n, n) for i in range(3))
            yield prefix + f"self_attn.q_proj.{kind}", q
            yield prefix + f"self_attn.k_proj.{kind}", k
            yield prefix + f"self_attn.v_proj.{kind}", v
        elif suffix in _LAYER_NAMES:
            yield prefix + _LAYER_NAMES[suffix], tensor
        else:
            yield name, tensor
