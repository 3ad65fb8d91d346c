"""Build a model from a Hugging Face directory: config.json + safetensors.

Checkpoint tensors keep Hugging Face names; fused parameters (q/k/v,
gate/up) are filled slice by slice. Pickle ``.bin`` checkpoints run
arbitrary code when loaded, so they are refused unless explicitly allowed.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator

import torch

from .config import ModelArgs
from .llama import LlamaForCausalLM
from .qwen_v1 import ARCHITECTURE as QWEN_V1, rename_tensors as qwen_v1_names

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# checkpoint suffix -> (our parameter path inside the layer, fused slice index)
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj_weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj_weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj_weight", 2),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj_bias", 0),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj_bias", 1),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj_bias", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj_weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj_weight", 1),
}
_PLAIN = {
    "self_attn.o_proj.weight": "self_attn.o_proj_weight",
    "mlp.down_proj.weight": "mlp.down_proj_weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.q_norm.weight": "self_attn.q_norm.weight",
    "self_attn.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head"}


def weight_files(model_dir: str, load_format: str, allow_pickle: bool) -> tuple[str, list[str]]:
    """Return (kind, files) for a model directory; raise a clear error if none usable."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if load_format in ("auto", "safetensors"):
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
            if missing:
                raise FileNotFoundError(f"{model_dir!r}: shard(s) listed in model.safetensors.index.json are missing: {missing}")
            return "safetensors", [os.path.join(model_dir, s) for s in shards]
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if files:
            return "safetensors", files
        if load_format == "safetensors":
            raise FileNotFoundError(f"no .safetensors weights in {model_dir!r}")
    pt = sorted(glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt")))
    if pt and load_format in ("auto", "pt"):
        if not allow_pickle:
            raise ValueError(
                f"{model_dir!r} has only pickle weights ({os.path.basename(pt[0])}), which can run arbitrary code when "
                "loaded; convert them to safetensors, or pass allow_pickle_weights=True if you trust the files"
            )
        return "pt", pt
    raise FileNotFoundError(f"no model weights (*.safetensors) found in {model_dir!r}")


def _iter_tensors(kind: str, files: list[str], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt", device=device) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        for path in files:
            state = torch.load(path, map_location=device, weights_only=True)
            yield from state.items()


def _target(model: LlamaForCausalLM, name: str):
    """(parameter, slice index or None) for a checkpoint name; None if ignored."""
    if name in _TOP:
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            return None  # some tied checkpoints store it anyway
        return model.get_parameter(_TOP[name]), None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = model.layers[int(m.group(1))] if int(m.group(1)) < len(model.layers) else None
    suffix = m.group(2)
    if layer is None or suffix.endswith("rotary_emb.inv_freq"):
        return None
    if suffix in _FUSED:
        path, idx = _FUSED[suffix]
        return layer.get_parameter(path), idx
    if suffix in _PLAIN:
        try:
            return layer.get_parameter(_PLAIN[suffix]), None
        except AttributeError:
            return None
    return None


def _fused_slices(model: LlamaForCausalLM, param_name: str) -> list[int]:
    a = model.args
    if "qkv" in param_name:
        return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
    return [a.intermediate_size, a.intermediate_size]


def load_model(model_dir: str, args: ModelArgs, dtype: torch.dtype, device: torch.device, *,
               load_format: str = "auto", allow_pickle: bool = False, seed: int = 0) -> LlamaForCausalLM:
    # Build directly in the target dtype and device: a float32 staging copy of
    # a 7B model would not fit beside the bf16 one.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(args)
    finally:
        torch.set_default_dtype(old)
    if load_format == "dummy":
        _dummy_init(model, seed)
        return model.eval()

    kind, files = weight_files(model_dir, load_format, allow_pickle)
    names = {id(p): n for n, p in model.named_parameters()}
    loaded: set[tuple[str, object]] = set()
    tensors = _iter_tensors(kind, files, "cpu")
    if args.architecture == QWEN_V1:
        tensors = qwen_v1_names(tensors)
    for name, tensor in tensors:
        target = _target(model, name)
        if target is None:
            continue
        param, idx = target
        pname = names[id(param)]
        if idx is None:
            dest = param.data
        else:
            sizes = _fused_slices(model, pname)
            start = sum(sizes[:idx])
            dest = param.data.narrow(0, start, sizes[idx])
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} from config.json")
        dest.copy_(tensor)
        loaded.add((pname, idx))

    expected = set()
    for pname, p in model.named_parameters():
        if "qkv_proj" in pname or "gate_up_proj" in pname:
            expected.update((pname, i) for i in range(len(_fused_slices(model, pname))))
        else:
            expected.add((pname, None))
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir!r} lacks weights for: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return model.eval()


@torch.no_grad()
def _dummy_init(model: LlamaForCausalLM, seed: int) -> None:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
