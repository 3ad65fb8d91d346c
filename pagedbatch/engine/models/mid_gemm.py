"""fp8 x fp8 GEMM for mid-sized batches (17-512 rows): ``y = (xq * xs) @ (W * ws[:, None]).T + bias`` in Triton.

Why a kernel of our own. Above the skinny GEMM's rows (``skinny_max_m``) an
fp8 linear layer quantized its activation per token and called
``torch._scaled_mm`` (cuBLASLt with row-wise scales). On a small model's
shapes (Qwen3-0.6B: K of 1,024-3,072) at 32-256 rows and on Qwen2.5-7B's at
32-64 that GEMM ran slower than cuBLAS's bf16 one, so fp8 weights made those
batches slower where they should make them faster (H200, 2026-12-04, the
four linears of every layer in a CUDA graph, quantization included: 0.6B at
32 rows 1.26 ms against bf16's 0.71, 7B 4.41 against 3.76). These matmuls
are too small to fill the GPU with cuBLAS's tiles; their time is decided by
how many programs run and how soon each one's first tiles arrive, not by
the FLOP rate. Tiles picked per shape and row bucket by a sweep
(``bench/mid_gemm.py``) do better (0.86 and 3.38 ms); where they do not, the
table below has no entry and ``_scaled_mm`` stays the kernel. Shapes nobody
swept take one config at up to 32 rows (``DEFAULT_32``, never slower than
``_scaled_mm`` on the 20 matmuls of five models) and ``_scaled_mm`` above.
Steps with prefill (more than 512 rows, run eagerly) take it only where
their bucket has an entry: no slower than ``_scaled_mm`` on the GPU, and a
Triton launch costs the host far less than ``_scaled_mm``'s.

The numerics are ``_scaled_mm``'s: the activation quantized per token
beforehand (``fp8.quantize_per_token``, or the kernel producing it), e4m3 x
e4m3 products on the fp8 tensor cores, then the per-token and per-channel
scales, the bias, one rounding to the output dtype. Hopper's fp8 MMA sums
with fewer bits than float32 (Triton's default on sm_90 never promotes the
sums); the kernel adds them into a float32 accumulator every 128 products
(``max_num_imprecise_acc``), and its results are as close to the float64
product as ``_scaled_mm``'s (2-4e-3 of max |y| for both on the H200: the
bf16 output's rounding and the MMA's sums).

Shape of the work: one program per [BLOCK_M, BLOCK_N] output tile, the K
loop software-pipelined (``tl.range(num_stages=...)``); W is row-major
[N, K] (K-major, what the fp8 MMA wants for its second operand). Rows past
M or N re-read the last real row (clamped indexes, never stored) so loads
stay unmasked. Programs are ordered in groups of GROUP_M row tiles so
neighbours share W tiles in L2. Programmatic dependent launch as in
skinny_gemm: the first weight tile is requested before waiting for the
kernel that produced x (the quantization kernel, itself PDL-launched).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import torch

from .. import pdl

try:
    import triton
    import triton.language as tl

    from ..pdl import release_dependents, wait_for_producer
except ImportError:  # the CPU-only install has no Triton; nothing here is used then
    triton = None

FP8 = torch.float8_e4m3fn
_PROMOTE_EVERY = 128  # fp8 products summed by the MMA before a float32 add


@dataclasses.dataclass(frozen=True)
class MidConfig:
    """One launch configuration; ``str()`` gives the compact form the tuning table uses."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "group_m", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"MidConfig.{name} must be a power of two, got {v}")
        if min(self.block_m, self.block_n) < 16 or self.block_k < 32:
            raise ValueError(f"MidConfig needs block_m, block_n >= 16 and block_k >= 32 (MMA tiles), got {self}")
        if self.num_stages < 1:
            raise ValueError(f"MidConfig.num_stages must be >= 1, got {self}")

    def __str__(self) -> str:
        return (f"bm{self.block_m} bn{self.block_n} bk{self.block_k} g{self.group_m} "
                f"w{self.num_warps} st{self.num_stages}")

    @classmethod
    def parse(cls, text: str) -> "MidConfig":
        """Inverse of ``str()``: ``"bm64 bn64 bk128 g8 w4 st4"``."""
        m = re.fullmatch(r"\s*bm(\d+)\s+bn(\d+)\s+bk(\d+)\s+g(\d+)\s+w(\d+)\s+st(\d+)\s*", text)
        if not m:
            raise ValueError(f"not a mid_gemm config: {text!r} (expected e.g. 'bm64 bn64 bk128 g8 w4 st4')")
        return cls(*map(int, m.groups()))


# --------------------------------------------------------------------------
# Tuning: the one place to edit after running bench/mid_gemm.py.
# --------------------------------------------------------------------------

# (M bucket, N, K) -> config string, only where the sweep measured this kernel faster than torch._scaled_mm
# by more than 3% (each with the quantization kernel in front); other shapes at up to 32 rows take
# DEFAULT_32 below, everything else keeps _scaled_mm. From `bench/mid_gemm.py --model-config <model>
# [--tp N]` on the H200, 2026-12-04 (one run each; JSON bench/results/mid_gemm-2026-12-04-*-s9{D,G}.json):
# Qwen2.5-7B, Qwen3-0.6B, Llama-3.1-8B, Llama-3.1-70B's tensor-parallel rank of 8 (70B/8), Qwen2.5-0.5B;
# us per call with the quantization kernel.
TUNED: dict[tuple, str] = {
    (32, 4608, 3584): 'bm32 bn64 bk256 g8 w4 st4',  # 7B qkv: 13.5 us, _scaled_mm 17.1, bf16 12.1
    (64, 4608, 3584): 'bm64 bn32 bk256 g8 w4 st3',  # 7B qkv: 15.1 us, _scaled_mm 17.1, bf16 12.6
    (32, 3584, 3584): 'bm32 bn32 bk256 g8 w4 st4',  # 7B o: 12.3 us, _scaled_mm 16.2, bf16 12.3
    (64, 3584, 3584): 'bm32 bn64 bk256 g8 w4 st4',  # 7B o: 13.3 us, _scaled_mm 16.3, bf16 9.9
    (128, 3584, 3584): 'bm64 bn32 bk256 g8 w4 st3',  # 7B o: 15.1 us, _scaled_mm 16.5, bf16 10.3
    (32, 37888, 3584): 'bm32 bn64 bk128 g8 w4 st3',  # 7B gate_up: 44.3 us, _scaled_mm 65.3, bf16 73.5
    (64, 37888, 3584): 'bm64 bn64 bk128 g8 w4 st3',  # 7B gate_up: 52.3 us, _scaled_mm 61.9, bf16 73.4
    (32, 3584, 18944): 'bm32 bn32 bk256 g8 w4 st4',  # 7B down: 42.2 us, _scaled_mm 58.6, bf16 41.6
    (64, 3584, 18944): 'bm32 bn64 bk256 g8 w4 st4',  # 7B down: 48.1 us, _scaled_mm 58.1, bf16 43.8
    (128, 3584, 18944): 'bm64 bn32 bk256 g8 w4 st3',  # 7B down: 56.6 us, _scaled_mm 58.6, bf16 46.3
    (32, 4096, 1024): 'bm32 bn32 bk256 g8 w4 st3',  # 0.6B qkv: 6.7 us, _scaled_mm 8.3, bf16 5.4
    (64, 4096, 1024): 'bm64 bn32 bk256 g8 w4 st3',  # 0.6B qkv: 6.8 us, _scaled_mm 8.4, bf16 5.6
    (128, 4096, 1024): 'bm64 bn32 bk256 g8 w4 st3',  # 0.6B qkv: 7.2 us, _scaled_mm 8.6, bf16 5.6
    (256, 4096, 1024): 'bm64 bn64 bk128 g8 w4 st4',  # 0.6B qkv: 8.2 us, _scaled_mm 8.7, bf16 6.5
    (32, 1024, 2048): 'bm32 bn32 bk256 g8 w4 st4',  # 0.6B o: 7.7 us, _scaled_mm 10.5, bf16 6.0
    (64, 1024, 2048): 'bm32 bn32 bk256 g8 w4 st4',  # 0.6B o: 8.0 us, _scaled_mm 10.8, bf16 6.0
    (128, 1024, 2048): 'bm64 bn32 bk256 g8 w4 st4',  # 0.6B o: 8.7 us, _scaled_mm 10.9, bf16 6.2
    (256, 1024, 2048): 'bm64 bn32 bk256 g8 w4 st4',  # 0.6B o: 8.7 us, _scaled_mm 11.0, bf16 6.5
    (32, 6144, 1024): 'bm32 bn64 bk256 g8 w4 st4',  # 0.6B gate_up: 7.1 us, _scaled_mm 8.5, bf16 6.3
    (64, 6144, 1024): 'bm64 bn32 bk128 g8 w4 st4',  # 0.6B gate_up: 7.2 us, _scaled_mm 8.6, bf16 6.6
    (128, 6144, 1024): 'bm64 bn32 bk128 g8 w4 st4',  # 0.6B gate_up: 7.8 us, _scaled_mm 8.7, bf16 6.3
    (32, 1024, 3072): 'bm32 bn32 bk256 g8 w4 st4',  # 0.6B down: 11.0 us, _scaled_mm 14.7, bf16 7.8
    (64, 1024, 3072): 'bm32 bn32 bk256 g8 w4 st4',  # 0.6B down: 11.2 us, _scaled_mm 15.0, bf16 8.3
    (128, 1024, 3072): 'bm64 bn32 bk256 g8 w4 st4',  # 0.6B down: 12.2 us, _scaled_mm 14.9, bf16 8.0
    (256, 1024, 3072): 'bm64 bn32 bk256 g8 w4 st4',  # 0.6B down: 12.8 us, _scaled_mm 15.3, bf16 7.7
    (32, 1280, 8192): 'bm32 bn32 bk256 g8 w4 st4',  # 70B/8 qkv: 17.3 us, _scaled_mm 25.4, bf16 11.2
    (64, 1280, 8192): 'bm32 bn32 bk256 g8 w4 st4',  # 70B/8 qkv: 17.5 us, _scaled_mm 25.1, bf16 11.2
    (32, 8192, 1024): 'bm32 bn32 bk128 g8 w4 st4',  # 70B/8 o: 7.4 us, _scaled_mm 8.3, bf16 7.0
    (64, 8192, 1024): 'bm64 bn32 bk128 g8 w4 st4',  # 70B/8 o: 7.4 us, _scaled_mm 8.6, bf16 7.5
    (32, 7168, 8192): 'bm32 bn64 bk256 g8 w4 st4',  # 70B/8 gate_up: 23.4 us, _scaled_mm 35.2, bf16 34.8
    (64, 7168, 8192): 'bm64 bn64 bk256 g8 w4 st4',  # 70B/8 gate_up: 26.7 us, _scaled_mm 29.7, bf16 33.6
    (32, 8192, 3584): 'bm32 bn64 bk256 g8 w4 st4',  # 70B/8 down: 15.1 us, _scaled_mm 21.3, bf16 18.5
    (64, 8192, 3584): 'bm64 bn32 bk256 g8 w4 st3',  # 70B/8 down: 16.4 us, _scaled_mm 18.4, bf16 18.7
    (32, 6144, 4096): 'bm32 bn64 bk256 g8 w4 st4',  # 8B qkv: 13.5 us, _scaled_mm 16.7, bf16 16.9
    (64, 6144, 4096): 'bm64 bn32 bk256 g8 w4 st3',  # 8B qkv: 15.3 us, _scaled_mm 16.3, bf16 17.1
    (32, 4096, 4096): 'bm32 bn32 bk256 g8 w4 st4',  # 8B o: 11.7 us, _scaled_mm 15.7, bf16 14.3
    (64, 4096, 4096): 'bm64 bn32 bk256 g8 w4 st4',  # 8B o: 13.0 us, _scaled_mm 15.8, bf16 12.2
    (32, 28672, 4096): 'bm32 bn128 bk128 g8 w4 st4',  # 8B gate_up: 37.3 us, _scaled_mm 48.8, bf16 64.1
    (64, 28672, 4096): 'bm64 bn128 bk128 g8 w4 st3',  # 8B gate_up: 38.9 us, _scaled_mm 47.8, bf16 67.9
    (32, 4096, 14336): 'bm32 bn32 bk256 g8 w4 st4',  # 8B down: 32.3 us, _scaled_mm 44.5, bf16 36.3
    (64, 4096, 14336): 'bm64 bn32 bk256 g8 w4 st4',  # 8B down: 37.5 us, _scaled_mm 45.0, bf16 38.5
    (32, 1152, 896): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B qkv: 6.7 us, _scaled_mm 8.5, bf16 4.6
    (64, 1152, 896): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B qkv: 6.4 us, _scaled_mm 8.6, bf16 4.6
    (128, 1152, 896): 'bm64 bn32 bk128 g8 w4 st4',  # 0.5B qkv: 7.0 us, _scaled_mm 8.8, bf16 4.7
    (256, 1152, 896): 'bm64 bn32 bk128 g8 w4 st4',  # 0.5B qkv: 7.3 us, _scaled_mm 8.8, bf16 5.1
    (32, 896, 896): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B o: 6.6 us, _scaled_mm 8.2, bf16 4.3
    (64, 896, 896): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B o: 6.6 us, _scaled_mm 8.4, bf16 4.3
    (128, 896, 896): 'bm64 bn32 bk128 g8 w4 st4',  # 0.5B o: 7.0 us, _scaled_mm 8.6, bf16 4.4
    (256, 896, 896): 'bm64 bn32 bk128 g8 w4 st4',  # 0.5B o: 7.3 us, _scaled_mm 8.8, bf16 4.8
    (32, 9728, 896): 'bm32 bn32 bk128 g8 w4 st3',  # 0.5B gate_up: 8.9 us, _scaled_mm 9.4, bf16 7.8
    (64, 9728, 896): 'bm64 bn32 bk128 g8 w4 st4',  # 0.5B gate_up: 8.6 us, _scaled_mm 9.2, bf16 7.7
    (32, 896, 4864): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B down: 13.9 us, _scaled_mm 19.1, bf16 8.3
    (64, 896, 4864): 'bm32 bn32 bk256 g8 w4 st4',  # 0.5B down: 14.0 us, _scaled_mm 19.3, bf16 8.5
    (128, 896, 4864): 'bm64 bn32 bk256 g8 w4 st4',  # 0.5B down: 16.0 us, _scaled_mm 19.7, bf16 8.8
    (256, 896, 4864): 'bm64 bn32 bk256 g8 w4 st4',  # 0.5B down: 16.9 us, _scaled_mm 20.4, bf16 10.3
}

# Up to 512 rows: decode and small steps with prefill, replayed as CUDA graphs. Above: steps with prefill
# that run eagerly, where torch._scaled_mm's host path (~100 us a call under torch.profiler, H200,
# 2026-12-04) can outlast its GPU time; entries there only where ours is no slower on the GPU
# (bench/mid_gemm.py --ms 1024,...,8192 says which).
M_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# Shapes not in TUNED at up to 32 rows. Of all configs tried, the one never slower than _scaled_mm on the
# 20 matmuls of the five models above at 32 rows (1.03x at worst, 1.16x on average, the quantization kernel
# counted in both); at 64 rows no single config was (0.94x at worst), so other buckets need a TUNED entry.
# Only within the sizes those matmuls span (N 896-37,888, K 896-18,944).
DEFAULT_32 = "bm32 bn32 bk128 g8 w4 st4"
_DEFAULT_SPAN = ((896, 37888), (896, 18944))


def m_bucket(M: int) -> Optional[int]:
    """The tuning table's bucket for ``M`` rows: the smallest bucket >= M; None above the largest."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return None


def default_config(M: int, N: int, K: int) -> Optional[MidConfig]:
    """The config for this shape and row count (TUNED's, else DEFAULT_32 at up to 32 rows within its span),
    or None where ``_scaled_mm`` is the kernel."""
    mb = m_bucket(M)
    return None if mb is None else _default(mb, N, K)


@functools.lru_cache(maxsize=4096)
def _default(mb: int, N: int, K: int) -> Optional[MidConfig]:
    text = TUNED.get((mb, N, K))
    if text is None and mb == M_BUCKETS[0]:
        (n0, n1), (k0, k1) = _DEFAULT_SPAN
        text = DEFAULT_32 if n0 <= N <= n1 and k0 <= K <= k1 else None
    return MidConfig.parse(text) if text else None


def mid_supported(N: int, K: int, device) -> bool:
    """Whether the kernel can run: Triton, a CUDA GPU with fp8 (compute capability >= 8.9), K a multiple of
    16 (16-byte aligned rows)."""
    device = torch.device(device)
    if triton is None or device.type != "cuda" or K % 16 or N < 1:
        return False
    return _has_fp8(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_fp8(index: int) -> bool:
    # Cached: asked at every eager fp8 linear call (linear.route).
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (8, 9)


def mid_linear(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype = torch.bfloat16,
               config: Optional[MidConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(xq * xs) @ (weight * weight_scale[:, None]).T + bias``, returned in ``out_dtype``.

    xq: [M, K] float8_e4m3fn, rows contiguous; xs: [M] or [M, 1] float32 per-token scales; weight: [N, K]
    float8_e4m3fn contiguous; weight_scale: [N] float32; bias: [N] or None. config: overrides the table
    (required for shapes it lacks). CUDA-graph capturable: no host syncs, no allocation but the output.
    """
    if triton is None:
        raise RuntimeError("mid_linear needs Triton")
    if xq.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"mid_linear: xq and weight must be 2-D, got {tuple(xq.shape)} and {tuple(weight.shape)}")
    M, K = xq.shape
    N = weight.shape[0]
    if xq.dtype != FP8 or weight.dtype != FP8:
        raise ValueError(f"mid_linear: xq and weight must be float8_e4m3fn, got {xq.dtype} and {weight.dtype}")
    if weight.shape[1] != K or weight.stride() != (K, 1):
        raise ValueError(f"mid_linear: weight must be a contiguous [N, {K}] tensor, got {tuple(weight.shape)}")
    if xq.stride(-1) != 1:
        raise ValueError("mid_linear: xq's rows must be contiguous")
    if xs.numel() != M or xs.dtype != torch.float32:
        raise ValueError(f"mid_linear: xs must hold {M} float32 per-token scales")
    if weight_scale.numel() != N or weight_scale.dtype != torch.float32:
        raise ValueError(f"mid_linear: weight_scale must hold {N} float32 per-channel scales")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"mid_linear: bias has {bias.numel()} elements, expected {N}")
    c = config if config is not None else default_config(M, N, K)
    if c is None:
        raise ValueError(f"mid_linear: no config for M={M}, N={N}, K={K} (TUNED, DEFAULT_32); pass config=")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"mid_linear: out must be a [{M}, {N}] {out_dtype} tensor with contiguous rows")
    if M == 0:
        return out
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
    _mid_kernel[grid](
        xq, xs.reshape(-1), weight, weight_scale.reshape(-1), bias if bias is not None else out, out,
        M, N, K, xq.stride(0), out.stride(0),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        IMPRECISE=min(_PROMOTE_EVERY, c.block_k), HAS_BIAS=bias is not None, EVEN_K=K % c.block_k == 0,
        NUM_STAGES=c.num_stages, num_warps=c.num_warps, num_stages=c.num_stages, **pdl.launch_kwargs(xq.device))
    return out


# --------------------------------------------------------------------------
# The kernel (also run by the tests under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_k(rows, offs_k, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(rows + offs_k[None, :])
        else:
            return tl.load(rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)

    @triton.jit(do_not_specialize=["M"])
    def _mid_kernel(X, XS, W, WS, B, Y, M, N, K, stride_xm, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    IMPRECISE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                    NUM_STAGES: tl.constexpr, PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M row tiles walk the column tiles together: a W tile is fetched from HBM once per group.
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm_c = tl.minimum(rm, M - 1)
        rn_c = tl.minimum(rn, N - 1)
        x_rows = X + rm_c.to(tl.int64)[:, None] * stride_xm
        w_rows = W + rn_c.to(tl.int64)[:, None] * K
        n_iters = tl.cdiv(K, BLOCK_K)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = 0
        if PDL:
            # Weights never change: the first tile is in flight while the producer of x finishes.
            w = _load_k(w_rows, rk, K, EVEN_K)
            wait_for_producer(PDL, False)
            a = _load_k(x_rows, rk, K, EVEN_K)
            acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=IMPRECISE)
            start = 1
        for it in tl.range(start, n_iters, num_stages=NUM_STAGES):
            offs_k = it * BLOCK_K + rk
            w = _load_k(w_rows, offs_k, K, EVEN_K)
            a = _load_k(x_rows, offs_k, K, EVEN_K)
            acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=IMPRECISE)
        # As the skinny GEMM: the next kernel may launch once every program is past its main loop.
        release_dependents(PDL)

        acc = acc * tl.load(XS + rm_c)[:, None] * tl.load(WS + rn_c)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(B + rn_c).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)
