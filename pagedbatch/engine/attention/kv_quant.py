"""The fp8 KV cache's number format: which dtype, and how values go in and out.

An fp8 cache stores float8 e4m3 (``torch.float8_e4m3fn``, largest finite
value 448) with one float32 scale for K and one for V per layer:
``value = stored * scale``. The scales come from the checkpoint when it has
them (calibrated by the quantizer), else 1.0, as in vLLM. They travel as a
``[2]`` float32 device tensor (k, v), never as host floats, so a CUDA graph
captured once reads whatever the tensor holds.

Writes divide by the scale and saturate at +-448 before the cast: e4m3fn has
no infinity, and an out-of-range value must not become NaN. These two
functions are the specification; the Triton kernels do the same arithmetic
(IEEE division, clamp, round to nearest even).
"""
from __future__ import annotations

from typing import Optional

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

# Store an fp8 cache's V blocks key-contiguous ([kv_heads, head_dim, block_size] per block) for the Triton
# kernels, whose P @ V then reads fp8 through shared memory once (bench/fp8_v_layout_study.py). H200,
# 2026-12-04 (bench/decode_attention.py --v-layout key-contiguous, fp8 cache): decode 137.8 against 166.3 us
# per call on W-nano's shape, 113.4 against 134.7 on W1's. Results do not depend on it
# (tests/engine/test_fp8_kv_cache.py); the torch backend keeps the usual layout.
FP8_V_KEY_CONTIGUOUS = True


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache dtype for ``EngineConfig.kv_cache_dtype`` ("auto": the model's)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8' or 'fp8_e4m3', got {name!r}")


def check_kv_cache_device(dtype: torch.dtype, device: torch.device) -> None:
    """An fp8 cache on a GPU without fp8 support is refused at startup (the CPU reference path works anywhere)."""
    from ..models.fp8 import fp8_device_problem

    problem = fp8_device_problem(device) if dtype == FP8_KV_DTYPE else None
    if problem:
        raise ValueError(f"kv_cache_dtype 'fp8' needs a GPU with fp8 support ({problem}). Use kv_cache_dtype 'auto'.")


def key_contiguous_v(dtype: torch.dtype, backend_name: str) -> bool:
    """Whether the runner lays out V key-contiguous: an fp8 cache under the Triton backend, with the switch on."""
    return FP8_V_KEY_CONTIGUOUS and dtype == FP8_KV_DTYPE and backend_name == "triton"


def layer_caches(kv_cache: torch.Tensor, key_contiguous: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (k, v) views of the runner's [2, layers, blocks, block_size, kv_heads, head_dim] tensor,
    both in that logical layout; with ``key_contiguous`` a V block's bytes hold [kv_heads, head_dim,
    block_size], seen through a permuted view. Whole-block copies of ``kv_cache`` (copy-on-write, the
    prefix cache) are the same in either layout."""
    out = []
    for i in range(kv_cache.shape[1]):
        v = kv_cache[1, i]
        if key_contiguous:
            blocks, block_size, heads, dim = v.shape
            v = v.view(blocks, heads, dim, block_size).permute(0, 3, 1, 2)
        out.append((kv_cache[0, i], v))
    return out


def is_scaled(cache: torch.Tensor) -> bool:
    """Whether a cache tensor stores scaled fp8 (and so needs its layer's scales)."""
    return cache.dtype == FP8_KV_DTYPE


def checked_scale(cache: torch.Tensor, kv_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``kv_scale`` for a scaled cache (an error if missing), None for a plain one."""
    if not is_scaled(cache):
        return None
    if kv_scale is None or kv_scale.numel() != 2 or kv_scale.dtype != torch.float32:
        raise ValueError("an fp8 KV cache needs its layer's scales: a float32 tensor [k_scale, v_scale]")
    return kv_scale


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float -> e4m3: divide by the (0-d or 1-element) float32 ``scale``, saturate, round to nearest even."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 -> ``dtype``: the stored value times the float32 ``scale`` (exact in float32)."""
    return (x.float() * scale).to(dtype)
