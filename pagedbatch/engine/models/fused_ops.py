"""RMSNorm (with the residual add folded in) and SiLU-and-mul: torch on the CPU, one Triton kernel each on the GPU.

Unfused, a 7B layer's norms and activation are about ten elementwise passes
over [tokens, hidden] and [tokens, 2 * intermediate] tensors, ~15% of a decode
step and more of a prefill step. The kernels keep Hugging Face's rounding
points (the residual sum and the normalised value are rounded to the model
dtype before the weight multiply; silu(gate) is rounded before the multiply
by up), so bf16 results stay those of the reference up to float32
reassociation. The CPU path is the plain torch code, in Hugging Face's
operation order, so float32 greedy decoding matches it bit for bit.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import pdl
from .fp8 import FP8, Fp8Rows, quantize_per_token

try:
    import triton
    import triton.language as tl

    from ..pdl import wait_for_producer
    from .fp8 import fp8_row_scale, fp8_row_values
except ImportError:  # the CPU path needs no Triton
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             quant: bool = False) -> tuple[Union[torch.Tensor, Fp8Rows], Optional[torch.Tensor]]:
    """``norm(x + residual)`` and the new residual ``x + residual`` (None when no residual was given).

    ``x`` is [T, D] or [T, H, D] (per-head norms); the last dim must be contiguous. ``quant`` (2-D ``x``):
    the normed rows quantized per token to e4m3 for an fp8 linear (``Fp8Rows``), in the same pass on the GPU;
    the same bits as ``quantize_per_token`` of the unquantized output.
    """
    if _use_triton(x):
        return _rms_norm_triton(x, weight, eps, residual, quant)
    if residual is not None:
        x = residual = x + residual
    y = rms_norm_torch(x, weight, eps)
    return (_rows(y) if quant else y), residual


def silu_and_mul(gate_up: torch.Tensor, quant: bool = False) -> Union[torch.Tensor, Fp8Rows]:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim; ``quant`` (2-D): as ``rms_norm``'s."""
    if _use_triton(gate_up):
        return _silu_and_mul_quant_triton(gate_up) if quant else _silu_and_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.silu(gate) * up
    return _rows(y) if quant else y


def _rows(y: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(*quantize_per_token(y), y.dtype)


# --------------------------------------------------------------------------
# Triton kernels (also run by the tests under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, RO, Y, W, S, eps, s_xt, s_xh, s_rt, s_rot, s_yt, s_yh,
                         D: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, QUANT: tl.constexpr = False,
                         PDL: tl.constexpr = False):
        # QUANT: Y is e4m3 and S the rows' float32 scales; the row is rounded to X's dtype first, as the
        # unfused pair (this kernel, then fp8's _quant_rows_kernel reading its output) rounds it.
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: needs no wait
        wait_for_producer(PDL)
        x = tl.load(X + t * s_xt + h * s_xh + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + t * s_rt + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like a torch add
            tl.store(RO + t * s_rot + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
        normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
        if QUANT:
            y = (normed * w).to(X.dtype.element_ty).to(tl.float32)
            scale = fp8_row_scale(tl.max(tl.where(mask, tl.abs(y), 0.0), 0))
            tl.store(S + t, scale)
            tl.store(Y + t * s_yt + offs, fp8_row_values(y, scale).to(Y.dtype.element_ty), mask=mask)
        else:
            tl.store(Y + t * s_yt + h * s_yh + offs, (normed * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Y, s_xt, s_yt, N: tl.constexpr, BLOCK: tl.constexpr,
                             PDL: tl.constexpr = False):
        wait_for_producer(PDL)
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        # _silu_mul written out: through the helper this (bf16 hot-path, measured) kernel compiles to other
        # address arithmetic (PTX compared), so it keeps the code it was measured with.
        g = tl.load(X + t * s_xt + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + t * s_xt + N + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + t * s_yt + offs, (s * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul(x_row, offs, mask, N: tl.constexpr):
        # silu(gate) * up of a row's columns ``offs`` in float32, silu rounded to the row's dtype first.
        g = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + N + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(x_row.dtype.element_ty).to(tl.float32)
        return s * u

    @triton.jit
    def _silu_and_mul_quant_kernel(X, Q, S, s_xt, s_qt, N: tl.constexpr, BLOCK: tl.constexpr,
                                   PDL: tl.constexpr = False):
        # One program per row: the row's largest magnitude, then its e4m3 values. A row of at most BLOCK
        # columns stays in registers between the two; a longer one is gone over twice in BLOCK-wide steps (the
        # second recomputes, reading gate_up again from L2). Rounded to X's dtype at the points of
        # _silu_and_mul_kernel, so the bits are those of that kernel followed by fp8's _quant_rows_kernel.
        wait_for_producer(PDL)
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        if BLOCK >= N:
            mask = offs < N
            y = _silu_mul(X + t * s_xt, offs, mask, N).to(X.dtype.element_ty).to(tl.float32)
            scale = fp8_row_scale(tl.max(tl.where(mask, tl.abs(y), 0.0), 0))
            tl.store(S + t, scale)
            tl.store(Q + t * s_qt + offs, fp8_row_values(y, scale).to(Q.dtype.element_ty), mask=mask)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in range(0, N, BLOCK):
                y = _silu_mul(X + t * s_xt, k + offs, k + offs < N, N).to(X.dtype.element_ty).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(y))
            scale = fp8_row_scale(tl.max(amax, 0))
            tl.store(S + t, scale)
            for k in range(0, N, BLOCK):
                mask = k + offs < N
                y = _silu_mul(X + t * s_xt, k + offs, mask, N).to(X.dtype.element_ty).to(tl.float32)
                tl.store(Q + t * s_qt + k + offs, fp8_row_values(y, scale).to(Q.dtype.element_ty), mask=mask)


def _rms_norm_triton(x, weight, eps, residual, quant: bool = False):
    if x.stride(-1) != 1:
        x = x.contiguous()
    if quant and x.dim() != 2:
        raise ValueError("only 2-D (per-token) norms are quantized")
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    T, H, D = x3.shape
    y = torch.empty((T, H, D), dtype=FP8 if quant else x.dtype, device=x.device)
    scales = torch.empty((T, 1), dtype=torch.float32, device=x.device) if quant else y
    new_res = None
    if residual is not None:
        if H != 1:
            raise ValueError("a residual is only folded into 2-D (per-token) norms")
        new_res = torch.empty_like(residual)
    res = residual if residual is not None else x3
    ro = new_res if new_res is not None else x3
    if T:
        _rms_norm_kernel[(T, H)](
            x3, res, ro, y, weight, scales, eps, x3.stride(0), x3.stride(1), res.stride(0), ro.stride(0),
            y.stride(0), y.stride(1), D=D, BLOCK=triton.next_power_of_2(D), HAS_RES=residual is not None,
            QUANT=quant, num_warps=4 if D <= 4096 else 8, **pdl.launch_kwargs(x.device))
    if quant:
        return Fp8Rows(y.view(x.shape), scales, x.dtype), new_res
    return y.view(x.shape), new_res


def _silu_and_mul_triton(gate_up):
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    T, N2 = gate_up.shape
    n = N2 // 2
    y = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if T:
        _silu_and_mul_kernel[(T, triton.cdiv(n, block))](gate_up, y, gate_up.stride(0), y.stride(0), N=n,
                                                         BLOCK=block, num_warps=4, **pdl.launch_kwargs(gate_up.device))
    return y


# The SiLU·mul + quantize kernel's columns a pass (one program per row): a row of up to this many
# (intermediate) columns is read once and kept in registers; a longer row is gone over twice, this many
# columns a step.
# 4096 since 2026-12-06 (H100, bench/silu_quant.py, µs a call replayed from a CUDA graph, 2048 -> 4096):
# Qwen3-0.6B's 3,072 columns at 64 / 256 / 512 rows 5.66 -> 3.86, 6.51 -> 4.49, 8.22 -> 5.59 (one pass instead
# of two); Qwen2.5-7B's 18,944 at 64 / 256 rows 19.5 -> 12.4, 23.0 -> 16.2, at 512 rows 39.5 -> 40.6. End to end,
# alternated: W-nano fp8 weights + fp8 KV 27,191 / 27,298 -> 27,683 / 27,781 out tok/s (+1.8%), W1 at 512 with
# fp8 weights level (21,631 / 21,383 -> 21,504 / 21,491). 8192 is no faster on 0.6B and slower on 7B.
SILU_QUANT_MAX_BLOCK = 4096


def silu_quant_warps(block: int) -> int:
    """Warps for a SiLU·mul + quantize program that takes ``block`` columns a pass (16 or more a thread)."""
    return 4 if block <= 2048 else 8


def _silu_and_mul_quant_triton(gate_up):
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    T, N2 = gate_up.shape
    n = N2 // 2
    q = torch.empty((T, n), dtype=FP8, device=gate_up.device)
    scales = torch.empty((T, 1), dtype=torch.float32, device=gate_up.device)
    if T:
        block = min(triton.next_power_of_2(n), SILU_QUANT_MAX_BLOCK)
        _silu_and_mul_quant_kernel[(T,)](gate_up, q, scales, gate_up.stride(0), q.stride(0), N=n, BLOCK=block,
                                         num_warps=silu_quant_warps(block),
                                         **pdl.launch_kwargs(gate_up.device))
    return Fp8Rows(q, scales, gate_up.dtype)
