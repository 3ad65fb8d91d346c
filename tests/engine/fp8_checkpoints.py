"""Write pre-quantized fp8 checkpoints from a bf16/float32 one, in the layouts published models use.

``write_fp8_checkpoint(src, out, layout)`` quantizes every decoder linear
weight (q/k/v/o, gate/up/down) of ``src`` and copies everything else:

- ``hf-block``: Hugging Face ``quant_method: "fp8"`` with ``weight_block_size``:
  ``weight`` float8_e4m3fn, ``weight_scale_inv`` float32 [ceil(N/bn), ceil(K/bk)];
- ``hf-tensor``: the same without a block size: a 0-d ``weight_scale_inv`` per tensor;
- ``ct-channel`` / ``ct-tensor`` / ``ct-block``: compressed-tensors
  ``float-quantized``: ``weight_scale`` [N, 1] / [1] / blocks.

The scales go to a second safetensors file (with an index), so a loader must
pair tensors across files. Scales follow the usual rule (block, row or
tensor amax / 448); values are ``clamp(w / scale)`` rounded to e4m3.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYOUTS = ("hf-block", "hf-tensor", "ct-channel", "ct-tensor", "ct-block")


def _quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448.0, 448.0).to(FP8)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale [ceil(N/bn), ceil(K/bk)]) with ``w ~= q * scale`` of its block."""
    (n, k), (bn, bk) = w.shape, block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w
    amax = padded.view(nb, bn, kb, bk).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return _quantize(w, full), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, k = q.shape
    return q.float() * scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]


def quantize(w: torch.Tensor, layout: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, the scale tensor as the layout stores it)."""
    w = w.float()
    if layout.endswith("block"):
        return quantize_blocks(w, block)
    if layout.endswith("tensor"):
        amax = w.abs().max()
        scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
        return _quantize(w, scale), scale.reshape(() if layout.startswith("hf") else (1,))
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return _quantize(w, scale), scale  # [N, 1]


def dequantize(q: torch.Tensor, scale: torch.Tensor, layout: str, block: tuple[int, int]) -> torch.Tensor:
    if layout.endswith("block"):
        return dequantize_blocks(q, scale, block)
    return q.float() * scale.float().reshape(-1, 1) if layout.endswith("channel") else q.float() * scale.float()


def quantization_config(layout: str, block: tuple[int, int], ignore: list[str]) -> dict:
    if layout.startswith("hf"):
        cfg = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
               "modules_to_not_convert": ["lm_head", *ignore]}
        if layout == "hf-block":
            cfg["weight_block_size"] = list(block)
        return cfg
    strategy = layout.split("-")[1]
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": list(block) if strategy == "block" else None}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head", *ignore]}


def _ignored(name: str, ignore: list[str]) -> bool:
    import re

    return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def write_fp8_checkpoint(src: str, out: str, layout: str, *, block: tuple[int, int] = (48, 40),
                         ignore: Optional[list[str]] = None) -> str:
    """Write ``src``'s weights as an fp8 checkpoint of ``layout`` into ``out`` (tokenizer files copied).

    ``block``: the block-scale shape (real checkpoints use 128 x 128; the
    default leaves partial blocks at the edges of small test weights).
    ``ignore``: module names (or ``re:`` patterns) left unquantized. Returns ``out``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    ignore = list(ignore or [])
    os.makedirs(out, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, Path(out) / f.name)
    weights, scales = {}, {}
    for path in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                module = name.rsplit(".", 1)[0]
                if name.endswith(".weight") and module.split(".")[-1] in LINEARS and not _ignored(module, ignore):
                    q, s = quantize(t, layout, block)
                    weights[name] = q
                    scales[module + (".weight_scale_inv" if layout.startswith("hf") else ".weight_scale")] = s
                else:
                    weights[name] = t
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "model-00001-of-00002.safetensors"))
    save_file({k: v.contiguous() for k, v in scales.items()}, os.path.join(out, "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in weights},
                                            **{k: "model-00002-of-00002.safetensors" for k in scales}}}
    (Path(out) / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(layout, block, ignore)
    (Path(out) / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def checkpoint_weights(out: str, layout: str, block: tuple[int, int] = (48, 40)) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint written here, fp8 weights dequantized (float32), under their checkpoint names."""
    from safetensors import safe_open

    raw = {}
    for path in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            raw.update((n, f.get_tensor(n)) for n in f.keys())
    result = {}
    for name, t in raw.items():
        if name.endswith(("weight_scale", "weight_scale_inv")):
            continue
        stem = name[: -len("weight")]
        scale = raw.get(stem + "weight_scale_inv", raw.get(stem + "weight_scale"))
        result[name] = dequantize(t, scale, layout, block) if t.dtype == FP8 else t.float()
    return result
