"""Model shape read from a Hugging Face ``config.json`` (no transformers needed)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# architecture name -> (family flags). One module implements them all.
# Biases follow what transformers builds for each class, whatever config.json says: Llama and Qwen3 read
# ``attention_bias`` (q/k/v and o_proj) and Llama ``mlp_bias`` (gate/up/down); Qwen2 always has q/k/v bias and
# never o_proj bias; Mistral has none. A key the class does not read is ignored, as transformers ignores it.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {"reads_attention_bias": True, "reads_mlp_bias": True},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True, "reads_attention_bias": True},
    "QWenLMHeadModel": {"attention_bias": True},  # Qwen v1: its own config keys, see qwen_v1.py
}


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias
    o_proj_bias: bool = False
    mlp_bias: bool = False  # gate/up/down projections have a bias
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    torch_dtype: Optional[str] = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    # config.json's quantization_config (a pre-quantized checkpoint), read by quantization.py.
    quantization_config: Optional[dict] = None

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelArgs":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{model_dir!r} has no config.json: is it a Hugging Face model directory (save_pretrained output)?"
            )
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        return cls.from_hf_dict(cfg, source=path)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        from .qwen_v1 import is_qwen_v1, qwen_v1_model_args  # imports this module: import here

        if is_qwen_v1(cfg):
            return qwen_v1_model_args(cfg, source)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or cfg.get('model_type')!r} in {source}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        flags = SUPPORTED_ARCHITECTURES[arch]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} in {source}: only 'silu' (SwiGLU) is implemented")
        missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(map(repr, missing))}, needed for {arch}")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        attention_bias = flags.get("reads_attention_bias", False) and _flag(cfg, "attention_bias", source)
        # transformers 5 moved rope settings into rope_parameters; older files use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or rope.get("type")
        if rope_type and rope_type != "default":
            scaling = rope
        elif scaling and (scaling.get("rope_type") or scaling.get("type")) == "default":
            scaling = None
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if arch != "MistralForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias or flags.get("attention_bias", False),
            o_proj_bias=attention_bias,
            mlp_bias=flags.get("reads_mlp_bias", False) and _flag(cfg, "mlp_bias", source),
            qk_norm=flags.get("qk_norm", False),
            sliding_window=sliding,
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            eos_token_id=eos,
            bos_token_id=cfg.get("bos_token_id"),
            quantization_config=cfg.get("quantization_config"),
        )


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _flag(cfg: dict[str, Any], key: str, source: str) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        # bool("false") is True: a string here would silently switch the biases on.
        raise ValueError(f"{key} in {source} must be true or false, got {value!r}")
    return value


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, float32, as Hugging Face computes them (default, linear, llama3)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type") or s.get("type")
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def rope_cos_sin(args: ModelArgs, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32 table: cos of each frequency, then sin."""
    inv_freq = rope_inv_freq(args).to(device)
    pos = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
