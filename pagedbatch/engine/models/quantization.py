"""Which weights are fp8, and how pre-quantized checkpoints store theirs.

The engine's fp8 weights have one layout: ``float8_e4m3fn`` [N, K] with a
float32 scale per output channel [N] (``fp8.py``). Checkpoints come in three:

- bf16/fp16/fp32: quantized at load, per output channel.
- Hugging Face ``quantization_config.quant_method == "fp8"`` (DeepSeek-V3,
  Qwen3-FP8 releases, FineGrainedFP8): ``<module>.weight`` float8_e4m3fn and
  ``<module>.weight_scale_inv`` (the value is ``weight * weight_scale_inv``
  despite the name): [ceil(N/bn), ceil(K/bk)] block scales for
  ``weight_block_size: [bn, bk]``, or one scalar per tensor without it (older
  "fp8" checkpoints call that scalar ``weight_scale``).
  ``modules_to_not_convert`` names modules kept unquantized.
- compressed-tensors (``quant_method == "compressed-tensors"``, format
  ``float-quantized``; e.g. the Llama-3 / Qwen2.5 "FP8-Dynamic" releases):
  ``<module>.weight`` float8_e4m3fn and ``<module>.weight_scale`` [N, 1]
  (strategy ``channel``), a scalar (``tensor``) or blocks (``block``,
  ``block_structure``); ``ignore`` lists modules kept unquantized and each
  config group's ``targets`` those quantized (``Linear``: all).

Per-channel and per-tensor checkpoint scales become ours exactly (a fused
q/k/v or gate/up weight concatenates its parts' rows and scales). Block
scales cannot be written per channel exactly: a block-quantized weight is
dequantized (float32, exact) and re-quantized per output channel. That
rounds each value once more, by at most half an e4m3 step at its row's new
scale: |error| <= 2**-4 |w| for values in e4m3's normal range (|w| >=
2**-6 x row scale) and <= 2**-10 x row scale below it. We chose this over a
block-scaled GEMM path so that one kernel family (per-token x per-channel:
``torch._scaled_mm`` row-wise, the skinny GEMM) serves every checkpoint; the
accuracy tests bound the cost (tests/engine/test_fp8_checkpoints.py).

Static activation scales (``input_scale``, ``activation_scheme: static``)
are ignored: activations are always quantized per token, dynamically, which
is at least as accurate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import ModelArgs

# Our fused parameter (inside a layer) -> the Hugging Face modules it holds.
LINEAR_MODULES = {
    "self_attn.qkv_proj_weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj_weight": ("self_attn.o_proj",),
    "mlp.gate_up_proj_weight": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj_weight": ("mlp.down_proj",),
}
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
_CT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class CheckpointQuant:
    """A pre-quantized checkpoint's fp8 layout, from config.json's ``quantization_config``."""

    method: str  # "fp8" (Hugging Face) or "compressed-tensors"
    block: Optional[tuple[int, int]] = None  # the block-scale shape, when scales are blocks
    ignore: tuple[str, ...] = ()  # modules kept unquantized
    targets: Optional[tuple[str, ...]] = None  # compressed-tensors: modules quantized (None: every linear)

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint stores Hugging Face module ``module`` (``model.layers.0.mlp.up_proj``) in fp8."""
        if any(_matches(module, p) for p in self.ignore):
            return False
        return self.targets is None or any(t == "Linear" or _matches(module, t) for t in self.targets)


def _matches(name: str, pattern: str) -> bool:
    # compressed-tensors: exact names or "re:<regex>"; Hugging Face: a module prefix, a suffix, or a regex.
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def checkpoint_quant(qcfg: Optional[dict[str, Any]], source: str = "config.json") -> Optional[CheckpointQuant]:
    """The layout of a pre-quantized checkpoint (None for an unquantized one); ValueError for layouts we cannot load."""
    if not qcfg:
        return None
    method = qcfg.get("quant_method")
    if method == "fp8":
        fmt = qcfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
        block = qcfg.get("weight_block_size")
        ignore = qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or []
        return CheckpointQuant("fp8", _block(block, source), tuple(ignore))
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg, source)
    raise ValueError(
        f"{source}: the checkpoint is quantized with {method!r} (quantization_config.quant_method); pagedbatch "
        f"loads only fp8 checkpoints: quant_method 'fp8' or 'compressed-tensors' float-quantized 8-bit")


def _block(block: Any, source: str) -> Optional[tuple[int, int]]:
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{source}: weight block size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def _compressed_tensors(qcfg: dict[str, Any], source: str) -> CheckpointQuant:
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{source}: compressed-tensors quantization_config has no config_groups")
    targets: list[str] = []
    blocks = set()
    for gname, group in groups.items():
        where = f"{source}: quantization_config.config_groups.{gname}"
        fmt = group.get("format") or qcfg.get("format")
        if fmt not in _CT_FORMATS:
            raise ValueError(f"{where}: format {fmt!r} is not supported; pagedbatch loads fp8 "
                             f"({' or '.join(_CT_FORMATS)}) compressed-tensors checkpoints")
        w = group.get("weights") or {}
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise ValueError(f"{where}.weights: {w.get('num_bits')}-bit {w.get('type')!r} weights are not supported "
                             "(only 8-bit float: fp8 e4m3)")
        strategy = w.get("strategy")
        if strategy not in ("channel", "tensor", "block"):
            raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported (channel, tensor or block)")
        if strategy == "block":
            blocks.add(_block(w.get("block_structure"), source))
        targets += list(group.get("targets") or ["Linear"])
    if len(blocks) > 1:
        raise ValueError(f"{source}: config groups use different block structures {sorted(blocks)}")
    return CheckpointQuant("compressed-tensors", next(iter(blocks), None), tuple(qcfg.get("ignore") or ()),
                           tuple(targets))


def resolve_quantization(requested: Optional[str], args: ModelArgs, source: str = "config.json") -> Optional[str]:
    """The quantization the engine runs: ``requested`` (EngineConfig.quantization), or "fp8" for an fp8 checkpoint.

    ValueError when the checkpoint is quantized in a way we cannot load, or
    when ``requested`` asks for something else than what it holds.
    """
    ckpt = checkpoint_quant(args.quantization_config, source)
    if ckpt is None:
        return requested
    if requested not in (None, "fp8"):
        raise ValueError(f"quantization {requested!r} conflicts with the checkpoint, whose weights are fp8 "
                         f"({ckpt.method} quantization_config in {source}): use quantization 'fp8' or leave it unset")
    return "fp8"


def fp8_param_names(args: ModelArgs, quantization: Optional[str]) -> frozenset[str]:
    """Our parameters (``layers.3.mlp.down_proj_weight``) that hold fp8 weights.

    Every decoder linear, except those a pre-quantized checkpoint keeps
    unquantized (its ignore list): a fused parameter stays in the model
    dtype when any of its parts does.
    """
    if quantization != "fp8":
        return frozenset()
    ckpt = checkpoint_quant(args.quantization_config)
    names = set()
    for i in range(args.num_layers):
        for param, modules in LINEAR_MODULES.items():
            if ckpt is None or all(ckpt.quantizes(f"model.layers.{i}.{m}") for m in modules):
                names.add(f"layers.{i}.{param}")
    return frozenset(names)


def scale_layout(scale: torch.Tensor, shape: tuple[int, ...], block: Optional[tuple[int, int]], name: str) -> str:
    """"tensor", "channel" or "block": how checkpoint scale ``scale`` covers weight ``name`` of ``shape`` [N, K]."""
    N, K = shape
    if scale.numel() == 1:
        return "tensor"
    if block is not None and tuple(scale.shape) == (-(-N // block[0]), -(-K // block[1])):
        return "block"
    if scale.numel() == N and (scale.dim() == 1 or tuple(scale.shape) == (N, 1)):
        return "channel"
    raise ValueError(f"the scale of {name!r} has shape {tuple(scale.shape)}: neither one per tensor, one per "
                     f"output channel ({N}) nor {block} blocks of its shape {tuple(shape)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, layout: str, rows: tuple[int, int], cols: tuple[int, int],
               block: Optional[tuple[int, int]]) -> torch.Tensor:
    """float32 values of ``q``, the window ``rows`` x ``cols`` ((start, count) each) of a checkpoint weight."""
    scale = scale.to(q.device, torch.float32)
    values = q.float()
    if layout == "tensor":
        return values.mul_(scale.reshape(()))
    if layout == "channel":
        return values.mul_(scale.reshape(-1)[rows[0]: rows[0] + rows[1], None])
    r = torch.arange(rows[0], rows[0] + rows[1], device=q.device) // block[0]
    c = torch.arange(cols[0], cols[0] + cols[1], device=q.device) // block[1]
    return values.mul_(scale[r][:, c])


def channel_scales(scale: torch.Tensor, layout: str, rows: tuple[int, int]) -> torch.Tensor:
    """float32 [rows count] per-output-channel scales of a "tensor" or "channel" checkpoint scale."""
    scale = scale.float()
    if layout == "tensor":
        return scale.reshape(()).expand(rows[1])
    return scale.reshape(-1)[rows[0]: rows[0] + rows[1]]
