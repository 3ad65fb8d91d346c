"""Build a model from a Hugging Face directory: config.json + safetensors.

Checkpoint tensors keep Hugging Face names; fused parameters (q/k/v,
gate/up) are filled slice by slice. Pickle ``.bin`` checkpoints run
arbitrary code when loaded, so they are refused unless explicitly allowed.

Tensor parallel: each rank reads only its rows or columns of each tensor
(``safe_open(...).get_slice``), so no rank ever holds a whole 70B layer;
``sharding.param_parts`` says which. Pickle checkpoints are loaded whole
(pickle cannot read part of a tensor) and then cut.

fp8 (``quantization.py``): a parameter held in fp8 is filled tensor by
tensor, on the target device: checkpoint fp8 weights with per-channel or
per-tensor scales are copied with their scales, anything else (bf16/fp16
values, block-scaled fp8) is quantized per output channel. A row-parallel
shard (o_proj, down_proj) holds part of each row, so it reads the whole
rows once more, in chunks, for their maxima: its scales and values are
then exactly the slices of the unsharded model's.

Every checkpoint tensor must land somewhere: one the model has no place for
(a bias of a variant we do not build, a layer past num_hidden_layers, a
feature added later) is an error, never silently dropped, except the few
that carry nothing (``_HARMLESS``, a tied ``lm_head.weight``).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator, Optional

import torch

from .config import ModelArgs
from .fp8 import FP8, check_fp8_support, quantize_rows
from .llama import LlamaForCausalLM
from .quantization import (SCALE_SUFFIXES, channel_scales, checkpoint_quant, dequantize, fp8_param_names,
                           resolve_quantization, scale_layout)
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
    "mlp.gate_proj.bias": ("mlp.gate_up_proj_bias", 0),
    "mlp.up_proj.bias": ("mlp.gate_up_proj_bias", 1),
}
_PLAIN = {
    "self_attn.o_proj.weight": "self_attn.o_proj_weight",
    "self_attn.o_proj.bias": "self_attn.o_proj_bias",
    "mlp.down_proj.weight": "mlp.down_proj_weight",
    "mlp.down_proj.bias": "mlp.down_proj_bias",
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
# Checkpoint tensors that hold nothing the model needs: rotary frequencies (recomputed from config.json) and
# static activation scales (activations are always quantized per token: quantization.py). Weight scales
# count as used only when they pair with an fp8 weight.
_HARMLESS = (".inv_freq", ".input_scale")


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

    @property
    def is_fp8(self) -> bool:
        if isinstance(self._src, torch.Tensor):
            return self._src.dtype == FP8
        return self._src.get_dtype() == "F8_E4M3"

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
    """(parameter, slice index or None) for a checkpoint name; None if the model has no place for it."""
    if name in _TOP:
        return model.get_parameter(_TOP[name]), None
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= len(model.layers):
        return None
    layer, suffix = model.layers[int(m.group(1))], m.group(2)
    path, idx = _FUSED.get(suffix) or (_PLAIN.get(suffix), None)
    if path is None:
        return None
    try:  # absent when config.json turns the feature off (no q/k norms, no biases)
        return layer.get_parameter(path), idx
    except AttributeError:
        return None


def _unused_error(model_dir: str, args: ModelArgs, unused: list[str]) -> ValueError:
    shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
    return ValueError(
        f"checkpoint in {model_dir!r} has tensors the {args.architecture} model built from its config.json would "
        f"not use: {shown}. Either config.json does not describe these weights (layer count, biases, q/k norms) "
        "or the checkpoint uses a feature this engine does not implement; refusing rather than dropping them")


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


def _fill(param: torch.Tensor, part: Part, source: TensorSource, name: str,
          scale: Optional[torch.Tensor] = None, source_scale: Optional[torch.Tensor] = None,
          block: Optional[tuple[int, int]] = None) -> int:
    """Copy this rank's part of a checkpoint tensor into ``param``; return the bytes read.

    ``scale``: the parameter's per-channel scales when ``param`` is fp8.
    ``source_scale``/``block``: the checkpoint tensor's own scales when it is
    fp8 (and their block shape, if the checkpoint declares one).
    """
    dest = param if part.dim is None else param.narrow(part.dim, part.dst_start, part.dst_len)
    want = list(dest.shape)
    if part.dim is not None:
        want[part.dim] = part.full_len
    if tuple(source.shape) != tuple(want):
        raise ValueError(f"weight {name!r} has shape {tuple(source.shape)}, expected {tuple(want)} from config.json")
    tensor = source.read(part)
    read = tensor.numel() * tensor.element_size()
    if scale is None and source_scale is None:
        _put(dest, part, tensor)
        return read
    tensor = tensor.to(dest.device)
    rows = (part.src_start, part.count) if part.dim == 0 else (0, source.shape[0])
    cols = (part.src_start, part.count) if part.dim == 1 else (0, source.shape[1])
    layout = None if source_scale is None else scale_layout(source_scale, source.shape, block, name)
    if scale is not None and layout in ("tensor", "channel"):  # the checkpoint's fp8 values are ours exactly
        _put(dest, part, tensor)
        _put_scales(scale, part, channel_scales(source_scale, layout, rows).to(scale.device))
        return read
    values = tensor if layout is None else dequantize(tensor, source_scale, layout, rows, cols, block)
    if scale is None:  # an fp8 checkpoint tensor into a parameter kept in the model dtype
        _put(dest, part, values)
        return read
    amax = None
    if cols[1] < source.shape[1]:  # a row-parallel shard: scales from the whole rows, as without sharding
        amax, more = _row_maxima(source, source_scale, layout, block, dest.device)
        read += more
    q, s = quantize_rows(values, amax)
    _put(dest, part, q)
    _put_scales(scale, part, s)
    return read


def _put(dest: torch.Tensor, part: Part, tensor: torch.Tensor) -> None:
    if part.dim is None:
        dest.copy_(tensor)
        return
    dest.narrow(part.dim, 0, part.count).copy_(tensor)
    dest.narrow(part.dim, part.count, part.dst_len - part.count).zero_()  # padding rows of the last shard


def _put_scales(scale: torch.Tensor, part: Part, s: torch.Tensor) -> None:
    if part.dim != 0:  # all output channels
        scale.copy_(s)
        return
    rows = scale.narrow(0, part.dst_start, part.dst_len)
    rows[: part.count].copy_(s)
    rows[part.count:].fill_(1.0)  # padding rows: zero weights, any scale


def _row_maxima(source: TensorSource, source_scale, layout, block, device,
                chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """max |w| of every whole row of a checkpoint weight (float32, on ``device``), read ``chunk`` rows at a time."""
    n, k = source.shape
    maxima, read = [], 0
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        t = source.read(Part(0, n, start, count, 0, count))
        read += t.numel() * t.element_size()
        t = t.to(device)
        v = t.float() if layout is None else dequantize(t, source_scale, layout, (start, count), (0, k), block)
        maxima.append(v.abs().amax(dim=1))
    return torch.cat(maxima), read


def _build(args: ModelArgs, dtype: torch.dtype, device, shard: TPShard, comm,
           fp8_params: frozenset = frozenset()) -> LlamaForCausalLM:
    # Build directly in the target dtype and device: a float32 staging copy of
    # a 7B model would not fit beside the bf16 one.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(args, shard, comm, fp8_params)
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def load_model(model_dir: str, args: ModelArgs, dtype: torch.dtype, device: torch.device, *,
               load_format: str = "auto", allow_pickle: bool = False, seed: int = 0,
               shard: TPShard = TPShard(), comm=None, quantization: Optional[str] = None) -> LlamaForCausalLM:
    """The model (this rank's shard of it) with its weights; ``model.checkpoint_bytes_read`` says what was read.

    ``quantization``: EngineConfig.quantization ("fp8", or None: as the
    checkpoint stores its weights; an fp8 checkpoint implies "fp8").
    """
    quantization = resolve_quantization(quantization, args, os.path.join(model_dir, "config.json"))
    if quantization == "fp8":
        check_fp8_support(torch.device(device))
    model = _build(args, dtype, device, shard, comm, fp8_param_names(args, quantization))
    if load_format == "dummy":
        _dummy_init(model, seed, dtype)
        return model.eval()

    kind, files = weight_files(model_dir, load_format, allow_pickle)
    ckpt = checkpoint_quant(args.quantization_config)
    block = ckpt.block if ckpt is not None else None
    source_scales = _read_scales(kind, files) if ckpt is not None else {}
    names = {id(p): n for n, p in model.named_parameters()}
    loaded: set[tuple[str, object]] = set()
    unused: list[str] = []
    used_scales: set[str] = set()
    tensors = _iter_tensors(kind, files)
    if args.architecture == QWEN_V1:
        tensors = qwen_v1_names(tensors)
    for name, source in tensors:
        if _load_kv_scale(model, name, source):
            continue
        if name.endswith(_HARMLESS) or name in source_scales \
                or (name == "lm_head.weight" and args.tie_word_embeddings):  # some tied checkpoints store it
            continue
        target = _target(model, name)
        if target is None:
            unused.append(name)
            continue
        param, idx = target
        pname = names[id(param)]
        part = param_parts(args, shard, pname)[idx or 0]
        scale = _scale_param(model, pname)
        source_scale = None
        if source.is_fp8:
            stem = name[: -len("weight")]
            scale_name = next((stem + s for s in SCALE_SUFFIXES if stem + s in source_scales), None)
            if scale_name is None:
                raise ValueError(f"{name!r} is float8 but the checkpoint in {model_dir!r} has no "
                                 f"{stem}weight_scale_inv or {stem}weight_scale for it")
            source_scale = source_scales[scale_name]
            used_scales.add(scale_name)
        model.checkpoint_bytes_read += _fill(param.data, part, source, name, scale, source_scale, block)
        loaded.add((pname, idx))

    # A weight scale with no fp8 weight to scale: a checkpoint quantized in a way we do not read.
    unused += sorted(set(source_scales) - used_scales)
    if unused:
        raise _unused_error(model_dir, args, unused)
    expected = set()
    for pname, p in model.named_parameters():
        if pname.endswith("_weight_scale"):
            continue  # filled with its weight
        if "qkv_proj" in pname or "gate_up_proj" in pname:
            expected.update((pname, i) for i in range(len(param_parts(args, shard, pname))))
        else:
            expected.add((pname, None))
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir!r} lacks weights for: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return model.eval()


def _scale_param(model: LlamaForCausalLM, pname: str) -> Optional[torch.Tensor]:
    """The per-channel scales of fp8 parameter ``pname`` (None when it is not fp8)."""
    if not pname.endswith("_weight"):
        return None
    module, _, attr = (pname + "_scale").rpartition(".")
    scale = getattr(model.get_submodule(module), attr, None)
    return None if scale is None else scale.data


def _read_scales(kind: str, files: list[str]) -> dict[str, torch.Tensor]:
    """Every weight-scale tensor of the checkpoint (small: one per channel, tensor or block), float32 on the CPU.

    Read before the weights: a weight and its scale may sit in different files, in any order.
    """
    out = {}
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(SCALE_SUFFIXES):
                        out[name] = f.get_tensor(name).float()
    else:
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=True)
            out.update((n, t.float()) for n, t in state.items() if n.endswith(SCALE_SUFFIXES))
    return out


@torch.no_grad()
def _dummy_init(model: LlamaForCausalLM, seed: int, dtype: torch.dtype) -> None:
    # A shard draws every full tensor in the unsharded model's order and keeps
    # its part, so each rank holds exactly its slice of the model one process
    # would build: TP results can be compared with TP 1 on dummy weights too.
    # fp8 weights are drawn in the model dtype (the same numbers as without
    # quantization) and quantized; their scales draw nothing.
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    full = {}  # the unsharded shapes (a model on the meta device: no memory)
    if model.shard.size > 1:
        full = dict(_build(model.args, torch.float32, "meta", TPShard(), None).named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        if name.endswith("_weight_scale"):
            continue
        scale = _scale_param(model, name)
        parts = param_parts(model.args, model.shard, name)
        if model.shard.size == 1 or parts[0].dim is None:
            if scale is None:
                p.normal_(0.0, 0.02, generator=g)
            else:
                q, s = quantize_rows(torch.empty(p.shape, dtype=dtype, device=p.device).normal_(0.0, 0.02, generator=g))
                p.copy_(q)
                scale.copy_(s)
            continue
        whole = torch.empty(full[name].shape, dtype=dtype, device=p.device).normal_(0.0, 0.02, generator=g)
        offset = 0  # fused parameters: part i of the whole tensor starts after parts 0..i-1
        for part in parts:
            rows = whole.narrow(0, offset, part.full_len) if len(parts) > 1 else whole
            _fill(p, part, TensorSource(rows, tuple(rows.shape)), name, scale)
            offset += part.full_len
