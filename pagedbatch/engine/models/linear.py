"""The model's one linear-layer entry point: ``linear(x, weight, bias, weight_scale)``.

Which kernel runs depends only on shapes, dtypes and the device, never on
tensor values, so the choice is fixed per CUDA-graph bucket and no call
syncs with the host:

- bf16/fp16/fp32 weights (``weight_scale`` None): ``F.linear``; on CUDA with
  few rows (decode) the skinny Triton GEMM instead when ``USE_SKINNY_BF16``
  and it supports the shape.
- fp8 weights (``float8_e4m3fn`` [N, K] with per-output-channel float32
  scales [N]), on CUDA:
  * few rows (M <= ``skinny_max_m(weight dtype)``): the skinny Triton GEMM, which reads
    the fp8 weight at full bandwidth (``torch._scaled_mm`` reads it at only
    ~1.8 TB/s for M <= 128 on an H200, no faster than bf16: bench/fp8_gemm.py);
  * more rows: the activation quantized per token by one fused Triton kernel
    (``fp8.quantize_per_token``), then ``torch._scaled_mm`` with row-wise
    scales (cuBLASLt), bf16 output; or our fp8 x fp8 Triton GEMM on the same
    quantized operands ("mid") for the shapes and row counts where a sweep
    measured it faster (``mid_gemm.TUNED``) and for other shapes of the sizes
    swept at 17-32 rows;
  * shapes ``_scaled_mm`` refuses (K or N not a multiple of 16, e.g. an
    odd tensor-parallel split) run the reference path below, with a warning.
- fp8 weights anywhere else (the CPU): the reference path, the GPU's
  numerics in float32: the weight dequantized with its scales, one float32
  matmul, and, for as many rows as the GPU quantizes activations at (more
  than ``skinny_max_m``: the ``_scaled_mm`` route), the activation quantized
  per token to e4m3 and back first. Few rows run weights-only on the GPU
  (bf16 activations into the skinny kernel), and the reference follows.

With ``FUSE_FP8_QUANT`` the model asks ``takes_fp8_rows`` before the
kernel that produces a linear's input (RMSNorm, SiLU·mul) and, on the
``_scaled_mm`` or mid route and from ``FUSE_FP8_QUANT_MIN_ROWS`` rows, has
that kernel quantize its output per token (``fp8.Fp8Rows``, the same
bits): one kernel fewer per linear layer.
``linear`` takes such rows as ``x``.

``norm_linear(x, residual, norm_weight, eps, weight, bias, weight_scale)`` is
an RMSNorm (the residual add folded in) and the linear after it: on the
skinny route, with ``FUSE_NORM`` (fp8 weights: and ``FUSE_NORM_FP8``), one
kernel (the residual add and the sum of squares ride along the operand
loads, 1/rms scales the output); elsewhere ``rms_norm`` and then ``linear``.

With ``FUSE_ROPE`` the qkv projection on the skinny route also rotates q and
k and writes this step's k and v to the KV cache in its epilogue
(``norm_linear(..., rope=)``, asked for where ``fuses_rope`` says so), so the
attention backend only attends.

``silu_mul_linear(gate_up, weight, weight_scale, bias)`` is the MLP's down
projection of ``silu(gate) * up``: for a single row on the skinny route the
activation runs inside the GEMM's operand load (one kernel instead of two),
elsewhere ``silu_and_mul`` and then ``linear`` (the activation rounded at
the same points either way).

The skinny GEMM lives in ``skinny_gemm.py`` (``skinny_linear``,
``skinny_max_m``, ``skinny_supported``), imported lazily: without Triton (or
that module) every fp8 matmul on CUDA takes the ``_scaled_mm`` path.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .fused_ops import rms_norm, silu_and_mul
from .fp8 import Fp8Rows, dequantize_rows, quantize_per_token, quantize_rows

log = logging.getLogger(__name__)

# Route bf16 weights with few rows through the skinny GEMM where it supports
# the shape. A module constant, not an engine option: it is the lead's switch
# to flip after measuring, and it must not change results beyond rounding.
USE_SKINNY_BF16 = True

# Quantize an fp8 linear's activation in the kernel that produces it (RMSNorm before qkv and gate_up,
# SiLU·mul before down) instead of in a kernel of its own before the fp8 GEMM: three fewer small kernels a
# layer, the same bits (tests/engine/test_fused_ops.py). On since 2026-12-06, from FUSE_FP8_QUANT_MIN_ROWS
# rows: at 64-token blocks, alternated on an H100 (bench/throughput.py --[no-]fuse-fp8-quant), it won every
# pair at full batches, W-nano with fp8 weights and cache +1.1-2.6% (4 pairs), W1 at 512 with fp8 weights
# +2.9-3.5% (3 pairs), but W1 at 32 rows ran 3.8% slower fused (2 pairs). Not the SiLU·mul + quantize kernel's
# width alone: at 8 warps and up to 8,192 columns a pass it still lost 2.7% there (2026-12-06, H100, 2 pairs;
# bench/results/profiles/session22-silu-quant-8warps.patch). Earlier H200 runs at 16-token blocks, before mid_gemm
# and the PDL-launched quantization kernel, had it 4-7% slower on W-nano (fused first each time).
FUSE_FP8_QUANT = True
FUSE_FP8_QUANT_MIN_ROWS = 33


@functools.lru_cache(maxsize=None)
def _mid():
    try:
        from . import mid_gemm
    except ImportError:
        return None
    return mid_gemm


@functools.lru_cache(maxsize=None)
def _skinny():
    try:
        from . import skinny_gemm
    except ImportError:
        return None
    return skinny_gemm


def route(M: int, N: int, K: int, weight_dtype: torch.dtype, device: torch.device, fp8: bool) -> str:
    """The kernel for an [M, K] x [N, K]^T product: "linear", "skinny", "mid", "scaled_mm" or "reference" (fp8
    in float32).

    Shapes, dtypes and the device only: static per CUDA-graph bucket.
    """
    if device.type != "cuda":
        return "reference" if fp8 else "linear"
    sk = _skinny()
    if (fp8 or USE_SKINNY_BF16) and sk is not None and M <= sk.skinny_max_m(weight_dtype) \
            and sk.skinny_supported(M, N, K, weight_dtype, device):
        return "skinny"
    if not fp8:
        return "linear"
    if _mid_config(M, N, K, device) is not None:
        return "mid"
    if not scaled_mm_supports(N, K):
        _warn_unsupported(N, K)
        return "reference"
    return "scaled_mm"


def skinny_variant_rows(weight: torch.Tensor, device: torch.device) -> list[int]:
    """Row counts whose ``linear`` calls on ``weight`` (without ``weight_scale`` iff not fp8) compile, between
    them, every skinny-GEMM variant any number of rows can need; [] where no row count takes that route."""
    sk = _skinny()
    if sk is None or device.type != "cuda":
        return []
    N, K = weight.shape
    fp8 = weight.dtype == torch.float8_e4m3fn
    return [m for m in sk.variant_rows(weight.dtype) if route(m, N, K, weight.dtype, device, fp8) == "skinny"]


def takes_fp8_rows(M: int, weight: torch.Tensor, weight_scale: Optional[torch.Tensor], device: torch.device) -> bool:
    """Whether ``linear`` wants its M-row input as ``Fp8Rows``, quantized by the kernel that produces it."""
    return (FUSE_FP8_QUANT and M >= FUSE_FP8_QUANT_MIN_ROWS and weight_scale is not None
            and route(M, weight.shape[0], weight.shape[1], weight.dtype, device, True) in ("scaled_mm", "mid"))


def linear(x: Union[torch.Tensor, Fp8Rows], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``; ``weight_scale`` [N] float32 marks ``weight`` as fp8 (see the module docstring).
    ``x`` may be ``Fp8Rows`` [M, K] where ``takes_fp8_rows`` said so."""
    if isinstance(x, Fp8Rows):
        if not takes_fp8_rows(x.q.shape[0], weight, weight_scale, x.q.device):
            raise ValueError("pre-quantized rows go only to an fp8 linear on the _scaled_mm or mid route "
                             "(takes_fp8_rows)")
        return _fp8_matmul(x.q, x.scale, weight, weight_scale, bias, x.dtype)
    if weight_scale is None and not x.is_cuda:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    (N, K), M = weight.shape, x2.shape[0]
    kind = route(M, N, K, weight.dtype, x.device, weight_scale is not None)
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "skinny":
        out = _skinny().skinny_linear(x2, weight, weight_scale, bias)
    elif kind in ("scaled_mm", "mid"):
        out = fp8_linear_dynamic(x2, weight, weight_scale, bias)
    else:
        out = fp8_linear_reference(x2, weight, weight_scale, bias, quantize_activations=M > weights_only_rows())
    return out.reshape(*lead, N)


# Fuse the RMSNorm before qkv and gate_up into the skinny GEMM (norm_linear): two kernels a layer fewer at
# decode's few rows. The normalised row is not rounded to the model dtype before the matmul (1/rms scales
# the float32 output instead), so results differ from the unfused pair by about one bf16 rounding.
FUSE_NORM = True
# ... but not in front of fp8 weights: the norm adds its operand work to the one-row fp8 loop (130 -> 160
# instructions a tile, sm_90), which costs there although that loop without the norm is not bound by its math
# (H200 2026-12-06, bench/skinny_stream_probe.py: with every multiply-add taken out gate_up's fp8 call is 4%
# faster, the others no faster). Single stream on the H200 (2026-12-05, bench/throughput.py --workload single
# --quantization fp8, twice each, alternated): norm fused 405 / 405 tok/s, not fused 418 / 418 (rope fused
# either way); bf16 gains from it (267 -> 270). On the H100, with less bandwidth a cycle, the fp8 fusion gained
# 1% (319 -> 322, 2026-12-05).
FUSE_NORM_FP8 = False


def fuses_norm(fp8: bool) -> bool:
    """Whether ``norm_linear`` on the skinny route runs the norm inside the matmul, for these weights."""
    return FUSE_NORM and (FUSE_NORM_FP8 or not fp8)


# Rotate q and k and write the KV cache in the epilogue of the qkv matmul on the skinny route (the model asks
# fuses_rope), instead of in the attention backend's rotary_cache_write kernel: one launch a layer fewer.
FUSE_ROPE = True


def fuses_rope(M: int, weight: torch.Tensor, weight_scale: Optional[torch.Tensor], device: torch.device) -> bool:
    """Whether ``norm_linear`` takes ``rope=`` for an M-row input to this (qkv) weight: the skinny route."""
    N, K = weight.shape
    return FUSE_ROPE and M > 0 and route(M, N, K, weight.dtype, device, weight_scale is not None) == "skinny"


def norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                weight_scale: Optional[torch.Tensor] = None, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(rms_norm(x + residual) * norm_weight, weight, bias, weight_scale)`` and the new residual
    ``x + residual`` (``x`` itself without a residual). x: [M, K]. ``rope``: a ``skinny_gemm.RopeCacheOut``
    for the qkv projection, only where ``fuses_rope`` said so."""
    M, (N, K) = x.shape[0], weight.shape
    fp8 = weight_scale is not None
    skinny = M > 0 and x.dim() == 2 and route(M, N, K, weight.dtype, x.device, fp8) == "skinny"
    if rope is not None and not (skinny and FUSE_ROPE):  # fuses_rope's condition
        raise ValueError("norm_linear: rope= only on the skinny route (linear.fuses_rope)")
    if skinny and fuses_norm(fp8):
        sk = _skinny()
        out, new_res = sk.skinny_norm_linear(x, sk.RMSNormIn(residual, norm_weight, eps), weight, weight_scale,
                                             bias, rope=rope)
        return out, (x if residual is None else new_res)
    h, new_res = rms_norm(x, norm_weight, eps, residual, x.dim() == 2 and takes_fp8_rows(M, weight, weight_scale,
                                                                                          x.device))
    out = _skinny().skinny_linear(h, weight, weight_scale, bias, rope=rope) if rope is not None \
        else linear(h, weight, bias, weight_scale)
    return out, (x if residual is None else new_res)


# Rows up to which silu_mul_linear fuses the activation into the skinny GEMM. H200, 2026-12-03
# (bench/skinny_gemm.py, Qwen2.5-7B down projection): at 1 row the fused kernel takes 37.5 us against 36.5 us
# plus the separate activation kernel (1.3 us) and its launch in the graph; fp8 21.7 against 20.4 + 1.3. At 4
# and 16 rows the fused kernel is slower than the pair (46.3 / 42.9 us against 41.6 / 38.6 + 1.3): every
# column tile recomputes the activation over its share of K.
FUSE_SILU_MAX_M = 1


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``linear(silu_and_mul(gate_up), weight, bias, weight_scale)``; ``gate_up`` is [..., 2K] for a [N, K] weight."""
    (N, K), M = weight.shape, gate_up.numel() // max(gate_up.shape[-1], 1)
    if 0 < M <= FUSE_SILU_MAX_M and gate_up.shape[-1] == 2 * K \
            and route(M, N, K, weight.dtype, gate_up.device, weight_scale is not None) == "skinny":
        return _skinny().skinny_linear(gate_up, weight, weight_scale, bias, act="silu_mul")
    quant = gate_up.dim() == 2 and takes_fp8_rows(M, weight, weight_scale, gate_up.device)
    return linear(silu_and_mul(gate_up, quant=quant), weight, bias, weight_scale)


def weights_only_rows() -> int:
    """Up to this many rows an fp8 matmul on the GPU keeps its activations in bf16 (the skinny kernel);
    above it they are quantized per token (``_scaled_mm``). Without the skinny kernel: none."""
    sk = _skinny()
    return sk.skinny_max_m(torch.float8_e4m3fn) if sk is not None else 0


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, quantize_activations: bool = True) -> torch.Tensor:
    """The fp8 numerics in float32 torch ops (any device): the dequantized weight times the activation,
    quantized per token to e4m3 and back when ``quantize_activations`` (the ``_scaled_mm`` route)."""
    a = dequantize_rows(*quantize_rows(x)) if quantize_activations else x.float()
    out = a @ dequantize_rows(weight, weight_scale).t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def scaled_mm_supports(N: int, K: int) -> bool:
    """cuBLASLt's fp8 GEMM needs both weight dimensions to be multiples of 16."""
    return N % 16 == 0 and K % 16 == 0


def fp8_linear_dynamic(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token fp8 activation (fused Triton kernel) times the fp8 weight: our Triton GEMM where it is tuned
    for the shape and row count, else ``torch._scaled_mm``; in ``x``'s dtype."""
    xq, xs = quantize_per_token(x)
    return _fp8_matmul(xq, xs, weight, weight_scale, bias, x.dtype)


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token fp8 activation (fused Triton kernel) times the fp8 weight through ``torch._scaled_mm``."""
    xq, xs = quantize_per_token(x)
    return _scaled_mm(xq, xs, weight, weight_scale, bias, x.dtype)


def _fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-token-quantized rows times the fp8 weight: our Triton GEMM where it is tuned for the shape, else
    ``torch._scaled_mm``."""
    config = _mid_config(xq.shape[0], *weight.shape, xq.device)
    if config is not None:
        return _mid().mid_linear(xq, xs, weight, weight_scale, bias, out_dtype=dtype, config=config)
    return _scaled_mm(xq, xs, weight, weight_scale, bias, dtype)


def _mid_config(M: int, N: int, K: int, device: torch.device):
    """mid_gemm's config for this fp8 product where that kernel is the one to run, else None (the one
    predicate behind both ``route``'s "mid" and the kernel ``_fp8_matmul`` launches)."""
    mid = _mid()
    if mid is None:
        return None
    config = mid.default_config(M, N, K)
    return config if config is not None and mid.mid_supported(N, K, device) else None


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # Row-wise scaling produces bf16 on every torch/cuBLAS version we run on (fp16 only on some), and a
    # bias must then be bf16 too: fp16/fp32 models pay one cast each way.
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1), bias=bias,
                           out_dtype=torch.bfloat16)
    return out if dtype == torch.bfloat16 else out.to(dtype)


@functools.lru_cache(maxsize=None)
def _warn_unsupported(N: int, K: int) -> None:
    log.warning("fp8 linear [N=%d, K=%d]: torch._scaled_mm needs N and K to be multiples of 16; this layer "
                "runs the slow reference path (dequantized float32 matmul)", N, K)
