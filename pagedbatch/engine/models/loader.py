"""Build a model from a Hugging Face directory: config.json + safetensors.

Checkpoint tensors keep Hugging Face names; fused parameters (q/k/v,
gate/up) are filled slice by slice. Pickle ``.bin`` checkpoints run
arbitrary code when loaded, so they are refused unless explicitly allowed.

Tensor parallel: each rank reads only its rows or columns of each tensor
(``safe_open(...).get_slice``), so no rank ever holds a whole 70B layer;
``sharding.param_parts`` says which. Pickle checkpoints are loaded whole
(pickle cannot read part of a tensor) and then cut.
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
from .sharding import Part, TPShard, param_parts

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
# fp8 KV-cache scales: checkpoint suffix -> which of the layer's [k_scale, v_scale] it sets (vLLM's and
# llm-compressor's names, compressed-tensors' k_proj/v_proj output scales, the older single kv_scale).
_KV_SCALES = {
    "self_attn.k_scale": (0,), "self_attn.v_scale": (1,),
    "self_attn.k_proj.output_scale": (0,), "self_attn.v_proj.output_scale": (1,),
    "self_attn.kv_scale": (0, 1),
}


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


class TensorSource:
    """A checkpoint tensor not read yet: ``shape``, and ``read(part)`` reads only the part's rows/columns.

    ``rows`` restricts it to a window of rows (Qwen v1's fused c_attn holds
    q, k and v one after the other).
    """

    def __init__(self, tensor_or_slice, shape: tuple[int, ...], row_offset: int = 0):
        self._src = tensor_or_slice  # a torch.Tensor, or a safetensors slice (read on indexing)
        self.shape = shape
        self._row_offset = row_offset

    def read_whole(self) -> torch.Tensor:
        """The whole tensor (small ones only: every rank reads it all)."""
        return self._src[...]

    def rows(self, start: int, count: int) -> "TensorSource":
        return TensorSource(self._src, (count, *self.shape[1:]), self._row_offset + start)

    def read(self, part: Part) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[0] = slice(self._row_offset, self._row_offset + self.shape[0])
        if part.dim is not None:
            lo = part.src_start + (self._row_offset if part.dim == 0 else 0)
            index[part.dim] = slice(lo, lo + part.count)
        return self._src[tuple(index)]


def _iter_tensors(kind: str, files: list[str]) -> Iterator[tuple[str, TensorSource]]:
    # Each source must be read before the next one is asked for: the file closes behind it.
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    yield name, TensorSource(sl, tuple(sl.get_shape()))
    else:
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, t in state.items():
                yield name, TensorSource(t, tuple(t.shape))


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


def _load_kv_scale(model: LlamaForCausalLM, name: str, source: TensorSource) -> bool:
    """Set a layer's KV-cache scale (replicated on every rank) if ``name`` is one; False if it is not."""
    m = _LAYER.match(name)
    which = _KV_SCALES.get(m.group(2)) if m else None
    if which is None:
        return False
    layer = int(m.group(1))
    if layer >= len(model.layers):
        return True
    value = source.read_whole().float()
    if value.numel() != 1:
        raise ValueError(f"{name!r} has shape {tuple(value.shape)}: one KV-cache scale per layer is supported, "
                         "not per-head or per-channel scales")
    scale = value.reshape(())
    if not bool(torch.isfinite(scale)) or scale.item() <= 0:
        raise ValueError(f"{name!r} is {scale.item()}: a KV-cache scale must be positive and finite")
    for i in which:
        model.layers[layer].self_attn.kv_scale[i] = scale
    model.kv_scales_loaded.add(layer)
    return True


def _fill(param: torch.Tensor, part: Part, source: TensorSource, name: str) -> int:
    """Copy this rank's part of a checkpoint tensor into ``param``; return the bytes read."""
    dest = param if part.dim is None else param.narrow(part.dim, part.dst_start, part.dst_len)
    want = list(dest.shape)
    if part.dim is not None:
        want[part.dim] = part.full_len
    if tuple(source.shape) != tuple(want):
        raise ValueError(f"weight {name!r} has shape {tuple(source.shape)}, expected {tuple(want)} from config.json")
    tensor = source.read(part)
    if part.dim is None:
        dest.copy_(tensor)
    else:
        dest.narrow(part.dim, 0, part.count).copy_(tensor)
        dest.narrow(part.dim, part.count, part.dst_len - part.count).zero_()  # padding rows of the last shard
    return tensor.numel() * tensor.element_size()


def _build(args: ModelArgs, dtype: torch.dtype, device, shard: TPShard, comm) -> LlamaForCausalLM:
    # Build directly in the target dtype and device: a float32 staging copy of
    # a 7B model would not fit beside the bf16 one.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(args, shard, comm)
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def load_model(model_dir: str, args: ModelArgs, dtype: torch.dtype, device: torch.device, *,
               load_format: str = "auto", allow_pickle: bool = False, seed: int = 0,
               shard: TPShard = TPShard(), comm=None) -> LlamaForCausalLM:
    """The model (this rank's shard of it) with its weights; ``model.checkpoint_bytes_read`` says what was read."""
    model = _build(args, dtype, device, shard, comm)
    if load_format == "dummy":
        _dummy_init(model, seed)
        return model.eval()

    kind, files = weight_files(model_dir, load_format, allow_pickle)
    names = {id(p): n for n, p in model.named_parameters()}
    loaded: set[tuple[str, object]] = set()
    tensors = _iter_tensors(kind, files)
    if args.architecture == QWEN_V1:
        tensors = qwen_v1_names(tensors)
    for name, source in tensors:
        if _load_kv_scale(model, name, source):
            continue
        target = _target(model, name)
        if target is None:
            continue
        param, idx = target
        pname = names[id(param)]
        part = param_parts(args, shard, pname)[idx or 0]
        model.checkpoint_bytes_read += _fill(param.data, part, source, name)
        loaded.add((pname, idx))

    expected = set()
    for pname, p in model.named_parameters():
        if "qkv_proj" in pname or "gate_up_proj" in pname:
            expected.update((pname, i) for i in range(len(param_parts(args, shard, pname))))
        else:
            expected.add((pname, None))
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir!r} lacks weights for: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return model.eval()


@torch.no_grad()
def _dummy_init(model: LlamaForCausalLM, seed: int) -> None:
    # A shard draws every full tensor in the unsharded model's order and keeps
    # its part, so each rank holds exactly its slice of the model one process
    # would build: TP results can be compared with TP 1 on dummy weights too.
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    full = {}  # the unsharded shapes (a model on the meta device: no memory)
    if model.shard.size > 1:
        full = dict(_build(model.args, torch.float32, "meta", TPShard(), None).named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        parts = param_parts(model.args, model.shard, name)
        if model.shard.size == 1 or parts[0].dim is None:
            p.normal_(0.0, 0.02, generator=g)
            continue
        whole = torch.empty(full[name].shape, dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=g)
        offset = 0  # fused parameters: part i of the whole tensor starts after parts 0..i-1
        for part in parts:
            rows = whole.narrow(0, offset, part.full_len) if len(parts) > 1 else whole
            _fill(p, part, TensorSource(rows, tuple(rows.shape)), name)
            offset += part.full_len
