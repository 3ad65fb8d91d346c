"""float8 (e4m3) numerics: per-row quantization of weights and activations, and the GPU check.

One rule everywhere: a row's scale is ``amax(|row|) / 448`` (float32; 1.0
for an all-zero row), its values are ``clamp(x / scale, -448, 448)`` cast
to ``float8_e4m3fn`` (round to nearest even), and ``q * scale`` gives them
back. Weights use it per output channel (at load time), activations per
token (at every linear layer, on the fly: "dynamic" scales).

On the GPU the activation's quantization is one Triton kernel (row amax,
scale, clamp and cast in one pass over the row): in plain torch ops it is
five passes and costs as much as the fp8 GEMM it feeds (bench/fp8_gemm.py).
Its divisions are round-to-nearest (``div_rn``), so its scales and values
are bit-identical to the torch formula the CPU reference path uses.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import pdl

try:
    import triton
    import triton.language as tl

    from ..pdl import wait_for_producer
except ImportError:  # the CPU path needs no Triton
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# fp8 matmuls (torch._scaled_mm, Triton fp8 dots) exist from Ada (8.9) and Hopper (9.0) on.
MIN_CAPABILITY = (8, 9)


class Fp8Rows(NamedTuple):
    """An activation [M, K] already quantized per token by the kernel that produced it (RMSNorm, SiLU·mul):
    what ``quantize_per_token`` returns, and the model dtype the rows were in (the matmul's output dtype)."""

    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] float32
    dtype: torch.dtype


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales for rows whose largest magnitude is ``amax`` (1.0 for all-zero rows)."""
    amax = amax.float()
    # A tensor divisor, not a Python number: CUDA torch turns division by a scalar into multiplication by
    # its rounded reciprocal, which is not always the correctly rounded quotient the Triton kernel computes.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor, amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [R, C] float8_e4m3fn, scale [R] float32) with ``x ~= q * scale[:, None]``; torch ops, any device.

    ``amax`` overrides the rows' own maxima (a tensor-parallel shard holding
    part of each row quantizes with the whole row's maximum).
    """
    # One float32 copy, divided in place, and max |x| without a temporary: loading quantizes one
    # tensor at a time, so a 7B model loads within its fp8 size plus ~1 GB.
    xf = x.to(torch.float32, copy=True)
    scale = row_scales(torch.linalg.vector_norm(xf, ord=float("inf"), dim=-1) if amax is None else amax)
    return xf.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale[:, None]``."""
    return q.float().mul_(scale.float()[:, None])


def quantize_per_token(x: torch.Tensor, out: Optional[torch.Tensor] = None,
                       scale_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation [M, K] as (q [M, K] float8_e4m3fn, scale [M, 1] float32): the shapes ``torch._scaled_mm`` takes.

    The fused Triton kernel on CUDA tensors, ``quantize_rows`` elsewhere.
    ``out``/``scale_out`` (optional) receive the results (tests poison them).
    """
    if triton is None or not x.is_cuda:
        q, s = quantize_rows(x)
        if out is not None:
            q = out.copy_(q)
        if scale_out is not None:
            s = scale_out.copy_(s[:, None])
        return q, s.view(-1, 1)
    return quantize_per_token_triton(x, out, scale_out)


def quantize_per_token_triton(x: torch.Tensor, out: Optional[torch.Tensor] = None,
                              scale_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (also on CPU tensors under TRITON_INTERPRET=1, for the tests)."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = out if out is not None else torch.empty((M, K), dtype=FP8, device=x.device)
    s = scale_out if scale_out is not None else torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        # The whole row in registers (one read) up to 8192 columns; longer rows (a 7B's down_proj input,
        # 18944) are read twice, the second time from L2.
        block = min(triton.next_power_of_2(K), 8192)
        # PDL (engine/pdl.py): the matmul after it launches while it runs and fetches its first weight tiles.
        _quant_rows_kernel[(M,)](x, q, s, x.stride(0), q.stride(0), K, BLOCK=block, ONE_BLOCK=block >= K,
                                 num_warps=4 if block <= 2048 else 8, **pdl.launch_kwargs(x.device))
    return q, s


def fp8_device_problem(device: torch.device) -> Optional[str]:
    """What a CUDA GPU without fp8 (compute capability < 8.9) lacks, naming it; None where fp8 runs (the CPU too)."""
    if device.type != "cuda":
        return None
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) >= MIN_CAPABILITY:
        return None
    return (f"compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Ada, Hopper or later; {device} is a "
            f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})")


def check_fp8_support(device: torch.device) -> None:
    """ValueError naming the GPU when ``device`` is a CUDA GPU without fp8 matmuls (compute capability < 8.9)."""
    problem = fp8_device_problem(device)
    if problem:
        raise ValueError(f"quantization 'fp8' needs a GPU with fp8 matmuls ({problem}). Run without "
                         "quantization (bf16), or on the CPU")


if triton is not None:

    # The rule above for kernels that produce an activation and quantize it in the same pass (fused_ops):
    # the scale of a row whose largest magnitude is ``amax``, and its values (float32; the store casts).
    @triton.jit
    def fp8_row_scale(amax):
        return tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)

    @triton.jit
    def fp8_row_values(y, scale):
        return tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0)

    @triton.jit
    def _quant_rows_kernel(X, Q, S, s_x, s_q, K, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
                           PDL: tl.constexpr = False):
        wait_for_producer(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        x_row = X + row * s_x
        q_row = Q + row * s_q
        if ONE_BLOCK:
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), 0)
        else:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in range(0, K, BLOCK):
                m = k + offs < K
                acc = tl.maximum(acc, tl.abs(tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)))
            amax = tl.max(acc, 0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        tl.store(S + row, scale)
        if ONE_BLOCK:
            q = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
            tl.store(q_row + offs, q.to(Q.dtype.element_ty), mask=mask)
        else:
            for k in range(0, K, BLOCK):
                m = k + offs < K
                xk = tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)
                q = tl.clamp(tl.math.div_rn(xk, scale), -448.0, 448.0)
                tl.store(q_row + k + offs, q.to(Q.dtype.element_ty), mask=m)
