"""Skinny GEMM for decode: ``y = x @ (W * scale[:, None]).T + bias`` for a few rows of ``x``, W bf16/fp16 or fp8.

Why a kernel of our own. At batch 1-16 a decode step does almost no
arithmetic per weight byte, so each linear layer is worth exactly the time it
takes to stream W from HBM once. cuBLAS gets there for the large gate_up
matmul (3.8 TB/s on the H200) but not for the small ones (qkv 3.0, o_proj 2.8
TB/s plus a separate split-K reduce kernel), and ``torch._scaled_mm`` reads
fp8 weights at only ~1.8 TB/s at small M, so fp8 weights bring nothing
there. A kernel whose only job is to keep enough weight bytes in flight gets
both: bf16 near the bandwidth, fp8 at the same bytes/s, i.e. twice as fast.

Shape of the work. Each program owns BLOCK_N output columns (rows of W) and
one contiguous share of K (split-K), and walks it in [BLOCK_N, BLOCK_K]
tiles. W is row-major [N, K], so a tile is BLOCK_N runs of BLOCK_K
contiguous elements: with BLOCK_K * itemsize >= 512 B a warp's 16-byte loads
cover whole rows, fully coalesced. fp8 weights are converted in registers
(exactly: every e4m3 value is a bf16/fp16 value) and the per-output-channel
scale is applied once, in the epilogue, since it factors out of the K sum.
Ways to do the multiply, chosen per config:
  - "fma": broadcast multiply-add in fp32, reduced over K once after the
    loop (for BLOCK_M = 1 the accumulator is a [BLOCK_N, BLOCK_K] tile, so
    the loop has no cross-thread traffic at all). Meant for M of 1-4: no
    padding rows, no tensor-core layout shuffles, but M multiply-adds per
    weight element (and a conversion), which fp8 at 2x the elements/s feels.
  - "dot": ``tl.dot`` with M padded to 16 (tensor cores need >= 16); padded
    rows re-read a real row (clamped index, never stored). "dotT" computes
    ``W @ x.T`` instead, so BLOCK_N is the MMA's M dimension (64/128 can use
    Hopper's wgmma) and the 16 padded rows its N dimension.
  - "dotH" (fp8 weights only): "dot" in fp16. e4m3 -> fp16 is one exact
    conversion per two weights, where e4m3 -> bf16/fp32 takes two or three
    (what bounds "fma" with fp8 at ~4 instructions a weight); x is scaled by
    2**-8 into fp16 (``_DOTH_X_SCALE``), products are exact and sums float32
    inside the MMA, and the epilogue multiplies 2**8 back with the channel
    scale.
Loads are software-pipelined through ``tl.range(num_stages=...)``: Triton
only pipelines loads that do not feed a ``tl.dot`` when the loop carries its
own num_stages, which is what keeps several tiles in flight per program in
the fma path too.

Split-K without extra kernels. o_proj and down_proj have N = 3584 (1024 for
Qwen3-0.6B): 56-224 column tiles cannot fill 132 SMs with enough loads in
flight, so K is split. The usual reductions cost a launch each (cuBLAS's
splitKreduce ~2 us, or a memset before fp32 atomics), at 28 layers x 2 such
matmuls per step. Here every split stores its fp32 partial to a workspace and
bumps a per-tile counter; the program that arrives last sums the partials in
split order (deterministic, unlike atomics), applies scale and bias, writes
the output and resets the counter to zero. One launch, no memset, and the
counters are zero again after every call, so CUDA-graph replays just work.
The counters live in one int32 buffer per device, zeroed once at the first
call (which must come before any graph capture, as a warm-up does anyway).
Two calls must not run concurrently on one device (different streams), since
they would share counters; the engine runs its model on one stream.

``act="silu_mul"`` fuses the MLP activation into the down projection's
operand load: x is the [M, 2K] gate_up output and the kernel uses
``silu(gate) * up`` rounded like ``fused_ops.silu_and_mul`` (silu rounded to
x's dtype, then the product), saving that kernel and its round trip. The
price: every column tile recomputes silu over its K share (N / BLOCK_N times
the exps of the unfused kernel), so whether it pays is for the sweep to say.

``skinny_norm_linear`` fuses the RMSNorm before qkv and gate_up (its
residual add included): the 1/rms of a row is a factor of every output of
that row, so the main loop multiplies the weight by ``(x + residual) *
norm_weight`` while it sums the squares, and the epilogue scales by 1/rms
(split-K: each split stores its share of the squares beside its partial,
the last arriver sums them). Programs of the first column tile store the
new residual. Two kernels a layer fewer in a decode step.

``rope=`` (``RopeCacheOut``) does the attention backend's rotary + cache
write in the qkv projection's epilogue: column tiles hold (d, d + head_dim/2)
pairs of one head, so each program can rotate its q and k columns at the
row's position and store k and v into the KV cache at the row's slot. One
kernel a layer fewer again.

Programmatic dependent launch (Hopper, ``engine/pdl.py``): each program
loads its first weight tile, then waits for the kernel that produces x; the
next kernel may launch once every program is past the main loop.

Any M is computed correctly (the grid has M tiles), but each M tile streams
all of W again: above skinny_max_m() cuBLAS / _scaled_mm are the kernels.

The tuning table and the default heuristic are together below ("Tuning"):
``bench/skinny_gemm.py`` prints measured best configs in the table's format.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import torch

from .. import pdl
from ..attention.kv_quant import checked_scale

try:
    import triton
    import triton.language as tl

    from ..attention.triton_kernels import _check_head_dim, check_k_cache, quantize_kv
    from ..pdl import release_dependents, wait_for_producer
except ImportError:  # the CPU-only install has no Triton; nothing here is used then
    triton = None

FP8 = torch.float8_e4m3fn
_LOCK_SLOTS = 1 << 16  # split-K tiles (N tiles x M tiles) one call may use
_KINDS = ("fma", "dot", "dotT", "dotH")
# dotH's activations go into fp16 times 2**-8 when they are bf16 (exact for |x| in [2**-6, 2**23]; smaller
# values keep at least bf16's absolute precision there): the product with e4m3 weights (<= 448) then never
# overflows fp16 operands for any activation a bf16 model produces below 2**23.
_DOTH_X_SCALE = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -8, torch.float16: 1.0}
# Bytes of its weight slice each program asks L2 to prefetch before it waits for x (PDL), one
# ``prefetch.global.L2`` per 128-byte line and thread: the weights stream from HBM while the kernel
# before finishes, instead of from the first load after the wait. 0: off. A per-thread instruction, unlike
# the eighth session's bulk prefetch (cp.async.bulk.prefetch.L2, uniform operands: the compiler looped it
# over the warp's addresses and single stream fell to 254 tok/s). GPU only (the interpreter has no asm).
# H100, 2026-12-05 (bench/decode_chain.py --l2-prefetch, Qwen2.5-7B at one row, two rounds): 8 KB a
# program 0.9-1.1% faster with fp8 weights (2,512 / 2,499 against 2,534 / 2,527 us) and level in bf16;
# 32 KB and more slower in both (up to 24% at a whole slice: the prefetches crowd out the loads).
L2_PREFETCH_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration; ``str()`` gives the compact form the tuning table uses.

    kind: "fma" (fp32 multiply-add, any block_m) or "dot"/"dotT"/"dotH" (tensor cores, block_m >= 16;
    dotH: fp8 weights only).
    split_k: how many programs share one column tile's K range (1: no workspace, no counters).
    unroll: the K loop's body repeated this many times per iteration (Triton's ``loop_unroll_factor``; 1: not
    unrolled). Offline on sm_90 (bench/kernel_sass.py, Triton 3.6) twice takes the one-row fp8 fma loop from
    131 to ~115 instructions a tile (64 -> 78 registers, 8 -> 6 programs per SM) and bf16's from 85 to ~69. On an
    H100 (2026-12-05, bench/decode_chain.py) the one-row chain ran 3% slower with every matmul unrolled, fp8 and
    bf16 alike: no tuned entry uses it. Fewer instructions are unlikely to pay on the H200 either: there the
    loop with its multiply-adds taken out is at most 4% faster (bench/skinny_stream_probe.py, 2026-12-06).
    """

    kind: str = "fma"
    block_m: int = 1
    block_n: int = 16
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    unroll: int = 1

    def __post_init__(self):
        def pow2(v):
            return v >= 1 and v & (v - 1) == 0

        if self.kind not in _KINDS:
            raise ValueError(f"SkinnyConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            if not pow2(getattr(self, name)):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two, got {getattr(self, name)}")
        if self.kind != "fma" and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"SkinnyConfig kind {self.kind!r} needs block_m, block_n, block_k >= 16 "
                             f"(tensor-core tiles), got {self}")
        if self.split_k < 1 or self.num_stages < 1 or self.unroll < 1:
            raise ValueError(f"SkinnyConfig.split_k, num_stages and unroll must be >= 1, got {self}")

    def __str__(self) -> str:
        return (f"{self.kind} bm{self.block_m} bn{self.block_n} bk{self.block_k} sk{self.split_k} "
                f"w{self.num_warps} st{self.num_stages}" + (f" u{self.unroll}" if self.unroll > 1 else ""))

    @classmethod
    def parse(cls, text: str) -> "SkinnyConfig":
        """Inverse of ``str()``: ``"fma bm1 bn16 bk256 sk4 w4 st4"``, optionally ``" u2"`` (unroll) after it."""
        m = re.fullmatch(r"\s*(fma|dotT|dotH|dot)\s+bm(\d+)\s+bn(\d+)\s+bk(\d+)\s+sk(\d+)\s+w(\d+)\s+st(\d+)"
                         r"(?:\s+u(\d+))?\s*", text)
        if not m:
            raise ValueError(f"not a skinny config: {text!r} (expected e.g. 'fma bm1 bn16 bk256 sk4 w4 st4', "
                             f"optionally ' u2')")
        kind, *nums = m.groups()
        return cls(kind, *(int(v) for v in nums if v is not None))


# --------------------------------------------------------------------------
# Tuning: the one place to edit after running bench/skinny_gemm.py.
# --------------------------------------------------------------------------

# Largest M each weight kind is meant for (skinny_max_m). Above it cuBLAS
# (bf16) or torch._scaled_mm (fp8, large M) is the better kernel.
# H200 sweep 2026-12-03: fp8 at M 64 loses to _scaled_mm. End to end on an H100 (2026-12-06, W-nano with fp8
# weights + fp8 KV, bench/throughput.py --skinny-fp8-max-m): fp8 up to 256 rows here, activations unquantized,
# 16% slower (23,862 / 23,577 against 27,805 / 28,384 out tok/s), up to 64 rows 2-3% slower (27,381).
MAX_M = {"bf16": 16, "fp8": 16}

# Measured best configs: (M bucket, N, K, "bf16" | "fp8") -> config string,
# and (M bucket, N, K, "bf16" | "fp8", "silu_mul") for the fused-activation
# down projection (which falls back to the plain key). M buckets are 1, 2, 4,
# 8, 16, 32, 64 (M is rounded up to one); shapes and buckets not listed use
# _heuristic_config. From `bench/skinny_gemm.py --quick --ms 1,4,16,64` on the
# H200, 2026-12-03 (Qwen2.5-7B shapes, one run; JSON in bench/results/); fp8 at
# M 2-16 from `bench/skinny_gemm.py --kinds fp8 --ms 2,4,8,16` on 2026-12-04
# (the dotH kind; bench/results/skinny_gemm-2026-12-04-*-s8B.json).
TUNED: dict[tuple, str] = {
    (1, 4608, 3584, 'bf16'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # qkv: 11.0 us, 3.00 TB/s, 1.16x cuBLAS bf16
    (1, 3584, 3584, 'bf16'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # o: 9.3 us, 2.78 TB/s, 1.28x cuBLAS bf16
    (1, 37888, 3584, 'bf16'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # gate_up: 65.7 us, 4.14 TB/s, 1.08x cuBLAS bf16
    (1, 3584, 18944, 'bf16'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # down: 36.5 us, 3.72 TB/s, 1.10x cuBLAS bf16
    (1, 3584, 18944, 'bf16', 'silu_mul'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # down+silu: 37.5 us, 3.62 TB/s, 1.13x cuBLAS bf16
    (1, 152064, 3584, 'bf16'): 'fma bm1 bn8 bk256 sk1 w4 st4',  # lm_head: 243.3 us, 4.48 TB/s, 1.04x cuBLAS bf16
    (4, 4608, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk2 w4 st4',  # qkv: 14.2 us, 2.33 TB/s, 0.82x cuBLAS bf16
    (4, 3584, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk4 w4 st4',  # o: 10.9 us, 2.35 TB/s, 1.08x cuBLAS bf16
    (4, 37888, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk1 w4 st4',  # gate_up: 72.1 us, 3.77 TB/s, 1.00x cuBLAS bf16
    (4, 3584, 18944, 'bf16'): 'dotT bm16 bn64 bk128 sk4 w4 st4',  # down: 41.6 us, 3.26 TB/s, 0.98x cuBLAS bf16
    (4, 3584, 18944, 'bf16', 'silu_mul'): 'dotT bm16 bn64 bk128 sk4 w4 st4',  # down+silu: 46.3 us, 2.93 TB/s, 0.93x cuBLAS bf16
    (4, 152064, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk1 w4 st4',  # lm_head: 250.9 us, 4.34 TB/s, 1.02x cuBLAS bf16
    (16, 4608, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk1 w4 st4',  # qkv: 12.7 us, 2.60 TB/s, 0.92x cuBLAS bf16
    (16, 3584, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk4 w4 st4',  # o: 10.7 us, 2.41 TB/s, 1.13x cuBLAS bf16
    (16, 37888, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk1 w4 st4',  # gate_up: 68.5 us, 3.97 TB/s, 1.07x cuBLAS bf16
    (16, 3584, 18944, 'bf16'): 'dot bm16 bn64 bk128 sk4 w4 st4',  # down: 38.6 us, 3.51 TB/s, 1.06x cuBLAS bf16
    (16, 3584, 18944, 'bf16', 'silu_mul'): 'dotT bm16 bn64 bk128 sk4 w4 st4',  # down+silu: 42.9 us, 3.17 TB/s, 1.02x cuBLAS bf16
    (16, 152064, 3584, 'bf16'): 'dotT bm16 bn64 bk128 sk1 w4 st4',  # lm_head: 250.9 us, 4.34 TB/s, 1.04x cuBLAS bf16
    (64, 4608, 3584, 'bf16'): 'dotT bm64 bn64 bk128 sk1 w4 st4',  # qkv: 13.7 us, 2.42 TB/s, 0.90x cuBLAS bf16
    (64, 3584, 3584, 'bf16'): 'dot bm64 bn32 bk128 sk1 w4 st4',  # o: 11.8 us, 2.18 TB/s, 0.84x cuBLAS bf16
    (64, 37888, 3584, 'bf16'): 'dotT bm64 bn64 bk128 sk1 w4 st4',  # gate_up: 77.7 us, 3.49 TB/s, 0.95x cuBLAS bf16
    (64, 3584, 18944, 'bf16'): 'dot bm64 bn32 bk128 sk2 w4 st4',  # down: 45.6 us, 2.98 TB/s, 0.93x cuBLAS bf16
    (64, 3584, 18944, 'bf16', 'silu_mul'): 'dot bm64 bn64 bk128 sk16 w4 st3',  # down+silu: 95.7 us, 1.42 TB/s, 0.49x cuBLAS bf16
    (64, 152064, 3584, 'bf16'): 'dot bm64 bn64 bk128 sk1 w4 st3',  # lm_head: 269.2 us, 4.05 TB/s, 0.99x cuBLAS bf16
    (1, 4608, 3584, 'fp8'): 'fma bm1 bn8 bk512 sk1 w4 st4',  # qkv: 7.4 us, 2.22 TB/s, 1.71x cuBLAS bf16
    (1, 3584, 3584, 'fp8'): 'fma bm1 bn8 bk512 sk1 w4 st4',  # o: 6.4 us, 2.02 TB/s, 1.86x cuBLAS bf16
    (1, 37888, 3584, 'fp8'): 'fma bm1 bn8 bk512 sk1 w4 st4',  # gate_up: 38.4 us, 3.54 TB/s, 1.86x cuBLAS bf16
    (1, 3584, 18944, 'fp8'): 'fma bm1 bn8 bk512 sk1 w4 st4',  # down: 20.4 us, 3.33 TB/s, 1.97x cuBLAS bf16
    (1, 3584, 18944, 'fp8', 'silu_mul'): 'fma bm1 bn16 bk512 sk1 w4 st4',  # down+silu: 21.7 us, 3.12 TB/s, 1.95x cuBLAS bf16
    (1, 152064, 3584, 'fp8'): 'fma bm1 bn8 bk512 sk1 w4 st4',  # lm_head: 126.9 us, 4.30 TB/s, 2.00x cuBLAS bf16
    (2, 4608, 3584, 'fp8'): 'fma bm2 bn4 bk512 sk1 w4 st4',  # qkv: 10.1 us, 1.64 TB/s
    (2, 3584, 3584, 'fp8'): 'fma bm2 bn8 bk512 sk1 w4 st4',  # o: 7.6 us, 1.68 TB/s
    (2, 37888, 3584, 'fp8'): 'dotH bm16 bn256 bk128 sk1 w8 st3',  # gate_up: 45.7 us, 2.97 TB/s
    (2, 3584, 18944, 'fp8'): 'dotH bm16 bn128 bk256 sk8 w4 st3',  # down: 25.0 us, 2.71 TB/s
    (2, 3584, 18944, 'fp8', 'silu_mul'): 'dotH bm16 bn256 bk128 sk16 w8 st3',  # down+silu: 27.6 us, 2.46 TB/s
    (2, 152064, 3584, 'fp8'): 'dotH bm16 bn128 bk256 sk1 w4 st3',  # lm_head: 142.6 us, 3.82 TB/s
    (4, 4608, 3584, 'fp8'): 'dotH bm16 bn128 bk128 sk4 w4 st3',  # qkv: 11.1 us, 1.49 TB/s
    (4, 3584, 3584, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # o: 8.7 us, 1.48 TB/s
    (4, 37888, 3584, 'fp8'): 'dotH bm16 bn256 bk128 sk1 w4 st3',  # gate_up: 44.7 us, 3.04 TB/s
    (4, 3584, 18944, 'fp8'): 'dotH bm16 bn128 bk128 sk8 w4 st3',  # down: 25.1 us, 2.71 TB/s
    (4, 3584, 18944, 'fp8', 'silu_mul'): 'dotH bm16 bn256 bk128 sk16 w8 st3',  # down+silu: 28.3 us, 2.40 TB/s
    (4, 152064, 3584, 'fp8'): 'dotH bm16 bn128 bk256 sk1 w4 st3',  # lm_head: 143.2 us, 3.81 TB/s
    (8, 4608, 3584, 'fp8'): 'dotH bm16 bn128 bk128 sk4 w4 st3',  # qkv: 10.9 us, 1.52 TB/s
    (8, 3584, 3584, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # o: 8.7 us, 1.48 TB/s
    (8, 37888, 3584, 'fp8'): 'dotH bm16 bn128 bk128 sk1 w4 st3',  # gate_up: 43.2 us, 3.14 TB/s
    (8, 3584, 18944, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # down: 25.5 us, 2.66 TB/s
    (8, 3584, 18944, 'fp8', 'silu_mul'): 'dotH bm16 bn256 bk128 sk16 w8 st3',  # down+silu: 28.6 us, 2.38 TB/s
    (8, 152064, 3584, 'fp8'): 'dotH bm16 bn128 bk256 sk1 w4 st3',  # lm_head: 140.5 us, 3.88 TB/s
    (16, 4608, 3584, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # qkv: 11.1 us, 1.48 TB/s
    (16, 3584, 3584, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # o: 9.1 us, 1.42 TB/s
    (16, 37888, 3584, 'fp8'): 'dotH bm16 bn128 bk128 sk1 w4 st3',  # gate_up: 41.6 us, 3.27 TB/s
    (16, 3584, 18944, 'fp8'): 'dotH bm16 bn64 bk256 sk4 w4 st4',  # down: 25.4 us, 2.67 TB/s
    (16, 3584, 18944, 'fp8', 'silu_mul'): 'dotH bm16 bn128 bk128 sk8 w4 st3',  # down+silu: 29.9 us, 2.27 TB/s
    (16, 152064, 3584, 'fp8'): 'dotH bm16 bn128 bk256 sk1 w4 st3',  # lm_head: 142.6 us, 3.82 TB/s
    (64, 4608, 3584, 'fp8'): 'dotT bm64 bn64 bk256 sk1 w4 st4',  # qkv: 24.5 us, 0.67 TB/s, 0.50x cuBLAS bf16
    (64, 3584, 3584, 'fp8'): 'dot bm64 bn32 bk256 sk1 w4 st4',  # o: 17.2 us, 0.75 TB/s, 0.58x cuBLAS bf16
    (64, 37888, 3584, 'fp8'): 'dotT bm64 bn64 bk256 sk1 w4 st4',  # gate_up: 118.4 us, 1.15 TB/s, 0.62x cuBLAS bf16
    (64, 3584, 18944, 'fp8'): 'dotT bm64 bn64 bk256 sk4 w4 st4',  # down: 65.9 us, 1.03 TB/s, 0.64x cuBLAS bf16
    (64, 3584, 18944, 'fp8', 'silu_mul'): 'dot bm64 bn64 bk256 sk16 w4 st3',  # down+silu: 202.7 us, 0.33 TB/s, 0.23x cuBLAS bf16
    (64, 152064, 3584, 'fp8'): 'dotT bm64 bn64 bk256 sk1 w4 st4',  # lm_head: 416.7 us, 1.31 TB/s, 0.64x cuBLAS bf16
}

_M_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _heuristic_config(mb: int, N: int, K: int, wkind: str, num_sms: int) -> SkinnyConfig:
    """A reasoned guess for shapes the sweep has not measured.

    fma for M <= 4 (fp8: M <= 2, whose conversion costs ALU per element), else
    tensor cores (fp8: dotH); ~8-16 KB of W per tile so a few stages keep ~32+ KB per SM in
    flight; split K until there are ~4 programs per SM, while each split keeps
    >= 4 tiles of K to pipeline.
    """
    itemsize = 1 if wkind == "fp8" else 2
    if mb <= (2 if wkind == "fp8" else 4):
        # One warp spans 512 B of a row (16 B per thread); the fp32 accumulator
        # (block_m * block_n * block_k / threads) stays at 32 registers.
        cfg = dict(kind="fma", block_m=mb, block_n=max(4, 16 // mb // (2 if wkind == "fp8" else 1)),
                   block_k=512 // itemsize, num_warps=4, num_stages=4)
    else:
        # Stages x (x tile + W tile) must fit in shared memory: 3 stages once the x tile is 32+ rows.
        # fp8: the fp16 MMA (dotH), which beat "dot" at every 7B shape for M 2-16 (2026-12-04 sweep).
        cfg = dict(kind="dotH" if wkind == "fp8" else "dot", block_m=max(16, mb), block_n=64,
                   block_k=256 // itemsize, num_warps=4, num_stages=4 if mb <= 16 else 3)
    tiles = -(-N // cfg["block_n"])
    iters = -(-K // cfg["block_k"])
    split = 1
    while tiles * split < 4 * num_sms and split < 16 and iters // (2 * split) >= 4:
        split *= 2
    return SkinnyConfig(split_k=split, **cfg)


# --------------------------------------------------------------------------
# Public interface
# --------------------------------------------------------------------------


def _wkind(weight_dtype: torch.dtype) -> str:
    if weight_dtype == FP8:
        return "fp8"
    return "bf16" if weight_dtype in (torch.bfloat16, torch.float16) else "fp32"


def m_bucket(M: int) -> int:
    """The tuning table's M bucket for ``M`` rows (the smallest bucket >= M; M above 64 uses 64)."""
    for b in _M_BUCKETS:
        if M <= b:
            return b
    return _M_BUCKETS[-1]


def variant_rows(weight_dtype: Optional[torch.dtype] = None) -> list[int]:
    """Row counts that, run once each, compile every variant ``skinny_linear`` launches for 1..skinny_max_m
    rows of one [N, K] weight: the variant follows M's tuning bucket and Triton's specialization of M
    (equal to 1, a multiple of 16, neither), so each bucket's smallest and largest M."""
    top = skinny_max_m(weight_dtype)
    rows, lo = set(), 1
    for b in _M_BUCKETS:
        if b > top:
            break
        rows.update((lo, b))
        lo = b + 1
    return sorted(rows)


def skinny_max_m(weight_dtype: Optional[torch.dtype] = None) -> int:
    """The largest M the kernel is meant for (for ``weight_dtype``; without one, for every weight dtype)."""
    if weight_dtype is None:
        return min(MAX_M.values())
    return MAX_M.get(_wkind(weight_dtype), MAX_M["bf16"])


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> Optional[int]:
    """The SM count of a CUDA device; None for the CPU (the interpreter)."""
    if device.type != "cuda":
        return None
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def skinny_supported(M: int, N: int, K: int, weight_dtype: torch.dtype, device) -> bool:
    """Whether ``skinny_linear`` is meant for this call: a CUDA device (fp8 weights: compute capability
    >= 8.9), 1 <= M <= skinny_max_m(weight_dtype), K a multiple of 16 (16-byte aligned weight rows),
    bf16/fp16/fp8-e4m3 weights."""
    device = torch.device(device)
    if triton is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    if weight_dtype not in (torch.bfloat16, torch.float16, FP8):
        return False
    if not (1 <= M <= skinny_max_m(weight_dtype)) or N < 1 or K < 16 or K % 16:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= ((8, 9) if weight_dtype == FP8 else (8, 0))


def default_config(M: int, N: int, K: int, weight_dtype: torch.dtype, act: Optional[str] = None,
                   num_sms: int = 132) -> SkinnyConfig:
    """The config ``skinny_linear`` uses without ``config=``: the tuned table, else the heuristic."""
    return _default_config(m_bucket(M), N, K, _wkind(weight_dtype), act, num_sms)


@functools.lru_cache(maxsize=4096)
def _default_config(mb: int, N: int, K: int, wkind: str, act: Optional[str], num_sms: int) -> SkinnyConfig:
    key = (mb, N, K, "bf16" if wkind == "fp32" else wkind)
    tuned = TUNED.get(key + (act,)) if act else None
    tuned = tuned or TUNED.get(key)
    if tuned is not None:
        return SkinnyConfig.parse(tuned)
    return _heuristic_config(mb, N, K, wkind, num_sms)


def override_tuned(spec: str) -> dict[tuple, str]:
    """Replace TUNED entries for this process (benchmarks' A/B runs): ``spec`` is ``KEY=CONFIG`` items joined by
    ``;``, each KEY ``M,N,K,kind`` or ``M,N,K,kind,silu_mul`` as in the table (M a bucket). Returns the entries
    set; raises ValueError naming the bad item before changing anything."""
    entries = {}
    for item in (s.strip() for s in spec.split(";")):
        if not item:
            continue
        key_text, sep, cfg_text = item.partition("=")
        parts = [p.strip() for p in key_text.split(",")]
        valid = (sep and len(parts) in (4, 5) and all(p.isdigit() for p in parts[:3]) and int(parts[0]) in _M_BUCKETS
                 and parts[3] in ("bf16", "fp8") and parts[4:] in ([], ["silu_mul"]))
        if not valid:
            raise ValueError(f"not a tuned entry: {item!r} (expected 'M,N,K,bf16|fp8[,silu_mul]=CONFIG' with M one "
                             f"of {_M_BUCKETS}, e.g. '1,37888,3584,fp8=fma bm1 bn16 bk256 sk1 w4 st4')")
        entries[(int(parts[0]), int(parts[1]), int(parts[2]), *parts[3:])] = str(SkinnyConfig.parse(cfg_text))
    TUNED.update(entries)
    _default_config.cache_clear()
    return entries


_locks: dict[tuple[str, int], torch.Tensor] = {}


def _lock_buffer(device: torch.device) -> torch.Tensor:
    """The device's split-K counters: zeroed once here, reset to zero by every kernel that uses them."""
    key = (device.type, device.index or 0)
    buf = _locks.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A zero-fill captured into a graph does not run now: later eager
            # calls would read garbage counters. A warm-up call avoids this.
            raise RuntimeError("skinny_linear: the first call on a device must run before CUDA graph capture "
                               "(run the model once as a warm-up)")
        buf = _locks[key] = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
    return buf


def _new_workspace(split_k: int, M: int, N: int, device) -> torch.Tensor:
    # A function of its own so tests can poison it.
    return torch.empty((split_k, M, N), dtype=torch.float32, device=device)


@dataclasses.dataclass(frozen=True)
class RMSNormIn:
    """The RMSNorm ``skinny_norm_linear`` fuses in front of its matmul: ``norm(x + residual) * weight``."""

    residual: Optional[torch.Tensor]  # [M, K] like x, or None (the norm of x alone)
    weight: torch.Tensor  # [K]
    eps: float


@dataclasses.dataclass(frozen=True)
class RopeCacheOut:
    """The rotary embedding and KV-cache write a qkv matmul can do in its epilogue (``rope=``): what
    ``attention.triton_kernels.rotary_cache_write`` does with the matmul's output, for the rows' tokens."""

    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos, then sin
    positions: torch.Tensor  # [M] int64
    slot_mapping: torch.Tensor  # [M] int64 flat cache slots; negative: not written
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim], head_dim contiguous
    v_cache: torch.Tensor  # the same logical shape, any strides
    kv_scale: Optional[torch.Tensor]  # [k_scale, v_scale] float32 for an fp8 cache, else None
    q_size: int  # output columns [0, q_size) are q, then kv_size of k, then kv_size of v
    kv_size: int


def _check_rope(rope: RopeCacheOut, M: int, N: int) -> tuple[RopeCacheOut, int, Optional[torch.Tensor]]:
    """(rope, head_dim, the fp8 cache's scales or None) after checking that the epilogue can do it."""
    kc, vc = rope.k_cache, rope.v_cache
    check_k_cache(kc)
    D = kc.shape[3]
    _check_head_dim(D)
    if vc.shape != kc.shape or rope.q_size % D or rope.kv_size != kc.shape[2] * D \
            or N != rope.q_size + 2 * rope.kv_size:
        raise ValueError(f"skinny_linear: rope= needs q_size + 2 * kv_size = {N} output columns of whole heads "
                         f"and caches of kv_size // head_dim heads, got q_size {rope.q_size}, kv_size "
                         f"{rope.kv_size}, caches {tuple(kc.shape)} / {tuple(vc.shape)}")
    if rope.positions.shape[0] < M or rope.slot_mapping.shape[0] < M:
        raise ValueError(f"skinny_linear: rope= needs positions and slots for {M} rows")
    cs = rope.cos_sin
    if cs.dtype != torch.float32 or cs.stride(-1) != 1 or cs.shape[-1] != D:
        raise ValueError(f"skinny_linear: rope= needs a float32 [positions, {D}] cos/sin table with contiguous rows")
    return rope, D, checked_scale(kc, rope.kv_scale)


def skinny_norm_linear(x: torch.Tensor, norm: RMSNormIn, weight: torch.Tensor,
                       weight_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                       config: Optional[SkinnyConfig] = None, out: Optional[torch.Tensor] = None,
                       residual_out: Optional[torch.Tensor] = None,
                       rope: Optional[RopeCacheOut] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``skinny_linear(rms_norm(x + residual), ...)`` in one kernel, and the new residual ``x + residual``
    (None without a residual). x: [M, K] with contiguous rows.

    The residual add is rounded like a torch add (the same bits as ``fused_ops.rms_norm``'s new residual).
    The normalised row is not: the kernel multiplies the weight by ``(x + residual) * norm.weight`` (float32
    for "fma", rounded once to bf16/fp16 for the tensor-core kinds) and each output row by its 1/rms in the
    epilogue, where the unfused pair rounds the row twice to x's dtype; results differ from it by about one
    such rounding of the operand, and are closer to the float32 norm + matmul (a GPU test pins both).
    residual_out: optional [M, K] buffer for the new residual. rope: as ``skinny_linear``'s.
    """
    if x.dim() != 2:
        raise ValueError(f"skinny_norm_linear: x must be [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    res = norm.residual
    if res is not None and (res.shape != x.shape or res.dtype != x.dtype or res.stride(-1) != 1):
        raise ValueError(f"skinny_norm_linear: the residual must be a {x.dtype} [{M}, {K}] tensor with "
                         f"contiguous rows, got {res.dtype} {tuple(res.shape)}")
    if norm.weight.shape != (K,) or not norm.weight.is_contiguous():
        raise ValueError(f"skinny_norm_linear: the norm weight must be a contiguous [{K}] tensor, "
                         f"got {tuple(norm.weight.shape)}")
    if res is None:
        residual_out = None
    elif residual_out is None:
        residual_out = torch.empty_like(x)
    elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or residual_out.stride(-1) != 1:
        raise ValueError(f"skinny_norm_linear: residual_out must be a {x.dtype} [{M}, {K}] tensor with "
                         f"contiguous rows")
    y = _skinny(x, weight, weight_scale, bias, None, config, out, (norm, residual_out), rope)
    return y, residual_out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, *, act: Optional[str] = None,
                  config: Optional[SkinnyConfig] = None, out: Optional[torch.Tensor] = None,
                  rope: Optional[RopeCacheOut] = None) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias``, accumulated in float32, returned in ``x.dtype``.

    x: [..., K] (``act="silu_mul"``: [..., 2K], the gate_up output; the kernel multiplies by
    ``silu(gate) * up``), last dim contiguous. weight: [N, K] contiguous, x's dtype or
    torch.float8_e4m3fn. weight_scale: [N] float32, required for fp8 weights, else None.
    bias: [N] or None. config: overrides the tuned/heuristic choice. out: optional [M, N] output.
    rope: a qkv projection's rotary embedding and cache write, done in the epilogue (``RopeCacheOut``): the
    output's q and k columns come back rotated and the caches hold this step's k and v, as after
    ``rotary_cache_write``; one launch fewer. (Column tiles then hold (d, d + head_dim / 2) pairs.)
    CUDA-graph capturable: no host syncs; the only allocations are the output and, with split-K,
    an fp32 workspace of [split_k, M, N].
    """
    return _skinny(x, weight, weight_scale, bias, act, config, out, None, rope)


def _skinny(x, weight, weight_scale, bias, act, config, out, norm, rope=None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("skinny_linear needs Triton")
    N, K = weight.shape
    silu_mul = act == "silu_mul"
    if act is not None and not silu_mul:
        raise ValueError(f"skinny_linear: act must be None or 'silu_mul', got {act!r}")
    kx = 2 * K if silu_mul else K
    if x.shape[-1] != kx:
        raise ValueError(f"skinny_linear: x has {x.shape[-1]} columns, expected {kx} for a [{N}, {K}] weight"
                         + (" with act='silu_mul'" if silu_mul else ""))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kx)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    is_fp8 = weight.dtype == FP8
    if is_fp8:
        if weight_scale is None or weight_scale.dtype != torch.float32 or weight_scale.numel() != N:
            raise ValueError(f"skinny_linear: fp8 weights need weight_scale, a float32 tensor of {N} "
                             f"per-output-channel scales")
    elif weight.dtype != x.dtype:
        raise ValueError(f"skinny_linear: weight dtype {weight.dtype} must be x's ({x.dtype}) or float8_e4m3fn")
    elif weight_scale is not None:
        raise ValueError("skinny_linear: weight_scale is only for fp8 weights")
    if config is not None and config.kind == "dotH" and not is_fp8:
        raise ValueError(f"skinny_linear: config kind 'dotH' is for fp8 weights, got {weight.dtype} ({config})")
    if weight.stride() != (K, 1):
        raise ValueError("skinny_linear: weight must be a contiguous [N, K] tensor")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"skinny_linear: bias has {bias.numel()} elements, expected {N}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"skinny_linear: out must be a [{M}, {N}] {x.dtype} tensor with contiguous rows")
    if M == 0:
        return out.view(*lead, N)
    if config is None:
        config = _default_config(m_bucket(M), N, K, _wkind(weight.dtype), act, _device_sms(x.device) or 132)
        if config.kind == "dotH" and x.dtype == torch.float32:
            config = dataclasses.replace(config, kind="dot")  # fp16 would round float32 activations
    if rope is not None and out.stride(0) != N:
        raise ValueError("skinny_linear: rope= needs a contiguous output")
    _launch(x2, weight, weight_scale, bias, out, M, N, K, silu_mul, config, norm,
            None if rope is None else _check_rope(rope, M, N))
    return out.view(*lead, N)


def split_plan(K: int, cfg: SkinnyConfig) -> tuple[int, int]:
    """(K tiles per split, splits launched): ``cfg.split_k`` trimmed so that no split is left without K."""
    n_iters = -(-K // cfg.block_k)
    per_split = -(-n_iters // cfg.split_k)
    return per_split, -(-n_iters // per_split)


def _launch(x, w, scale, bias, out, M, N, K, silu_mul, cfg: SkinnyConfig, norm=None, rope=None) -> None:
    per_split, split = split_plan(K, cfg)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    locks = _lock_buffer(x.device)  # also when unused: created at the first (warm-up) call, never in a capture
    ws = wsq = out  # unused without split-K
    if split > 1:
        if grid[0] * grid[2] > _LOCK_SLOTS:
            raise ValueError(f"skinny_linear: split-K over {grid[0] * grid[2]} output tiles exceeds the "
                             f"{_LOCK_SLOTS} counters; use a larger block_n or split_k=1 ({cfg})")
        ws = _new_workspace(split, M, N, x.device)
        if norm is not None:  # each split's share of the rows' sums of squares, per column tile
            wsq = _new_workspace(split, grid[0], M, x.device)
    f16_dot = cfg.kind == "dotH"
    if norm is not None:
        rms, res_out = norm
        has_res = rms.residual is not None
        r, ro = (rms.residual, res_out) if has_res else (x, x)
        norm_args = (r, ro, rms.weight, wsq, float(rms.eps), r.stride(0), ro.stride(0))
    else:
        has_res, norm_args = False, (out, out, out, wsq, 0.0, 0, 0)
    if rope is not None:
        r, D, kv_scale = rope  # _check_rope's
        kc, vc = r.k_cache, r.v_cache
        rope_args = (r.cos_sin, r.positions, r.slot_mapping, kc, vc, kv_scale if kv_scale is not None else out,
                     r.q_size, r.kv_size, r.cos_sin.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
                     vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3))
        rope_const = dict(ROPE=True, HALF=D // 2, CACHE_BLOCK=kc.shape[1], KV_SCALED=kv_scale is not None,
                          EXACT_MUL=x.is_cuda)
    else:
        rope_args, rope_const = (out, out, out, out, out, out, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), {}
    _skinny_kernel[grid](
        x, w, scale if scale is not None else out, bias if bias is not None else out, out, ws, locks,
        M, N, K, per_split, x.stride(0), out.stride(0), _DOTH_X_SCALE[x.dtype] if f16_dot else 1.0,
        *norm_args, *rope_args, NORM=norm is not None, HAS_RES=has_res, **rope_const,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        USE_DOT=cfg.kind != "fma", SWAP_AB=cfg.kind == "dotT", F16_DOT=f16_dot, W_FP8=w.dtype == FP8,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul, EVEN_K=K % cfg.block_k == 0, NUM_STAGES=cfg.num_stages, UNROLL=cfg.unroll,
        DOT_IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **prefetch_constexprs(K, w.element_size(), per_split, cfg, None if x.is_cuda else 0),
        **pdl.launch_kwargs(x.device))


def prefetch_lines(K: int, itemsize: int, per_split: int, cfg: SkinnyConfig,
                   budget: Optional[int] = None) -> int:
    """128-byte lines of each weight row a program prefetches into L2 (``L2_PREFETCH_BYTES`` per program,
    never past its own K share)."""
    budget = L2_PREFETCH_BYTES if budget is None else budget
    share = min(per_split * cfg.block_k, K) * itemsize
    return max(0, min(-(-share // 128), budget // (cfg.block_n * 128)))


def prefetch_constexprs(K: int, itemsize: int, per_split: int, cfg: SkinnyConfig,
                        budget: Optional[int] = None) -> dict:
    """The kernel's prefetch arguments for one launch (also bench/kernel_sass.py's)."""
    lines = prefetch_lines(K, itemsize, per_split, cfg, budget)
    return dict(PF_LINES=lines, PF_PAD=triton.next_power_of_2(max(lines, 1)), LINE_ELEMS=128 // itemsize)


# --------------------------------------------------------------------------
# The kernel (also run by the tests under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_x(x_rows, offs_k, K, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):
        """[BLOCK_M, BLOCK_K] of the activation (silu(gate) * up for SILU_MUL), in x's dtype."""
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :])
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)
        if SILU_MUL:
            if EVEN_K:
                u = tl.load(x_rows + K + offs_k[None, :])
            else:
                u = tl.load(x_rows + K + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)
            g = a.to(tl.float32)
            # Rounded where fused_ops.silu_and_mul rounds, so fusing changes no bits.
            s = (g / (1.0 + tl.exp(-g))).to(a.dtype).to(tl.float32)
            a = (s * u.to(tl.float32)).to(a.dtype)
        return a

    @triton.jit
    def _load_normed(x_rows, r_rows, ro_rows, NW, offs_k, K, ssq, store_res, EVEN_K: tl.constexpr,
                     HAS_RES: tl.constexpr, A_DTYPE: tl.constexpr):
        """The NORM operand: h = x (+ residual, rounded like a torch add and stored where ``store_res``),
        its squares added to ``ssq``, and ``h * norm_weight`` in float32 (A_DTYPE: rounded to it for
        tensor cores); rstd is applied to the output in the epilogue."""
        kmask = offs_k[None, :] < K
        if EVEN_K:
            h = tl.load(x_rows + offs_k[None, :])
            nw = tl.load(NW + offs_k)
        else:
            h = tl.load(x_rows + offs_k[None, :], mask=kmask, other=0.0)
            nw = tl.load(NW + offs_k, mask=offs_k < K, other=0.0)
        if HAS_RES:
            if EVEN_K:
                r = tl.load(r_rows + offs_k[None, :])
            else:
                r = tl.load(r_rows + offs_k[None, :], mask=kmask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
            tl.store(ro_rows + offs_k[None, :], h, mask=store_res & kmask)
        hf = h.to(tl.float32)
        ssq += hf * hf
        a = hf * nw.to(tl.float32)[None, :]
        if A_DTYPE is not None:
            a = a.to(A_DTYPE)
        return a, ssq

    @triton.jit
    def _prefetch_l2(w_rows, k0, K, PF_LINES: tl.constexpr, PF_PAD: tl.constexpr, LINE_ELEMS: tl.constexpr):
        """Ask L2 for PF_LINES 128-byte lines of each weight row from column k0 (one instruction per line)."""
        j = tl.minimum(tl.arange(0, PF_PAD), PF_LINES - 1)  # padding lanes repeat the last line
        ptrs = w_rows + tl.minimum(k0 + j * LINE_ELEMS, K - 1)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _load_w(w_rows, offs_k, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(w_rows + offs_k[None, :])
        else:
            return tl.load(w_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)

    @triton.jit
    def _mac(acc, w, a, x_scale, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr,
             F16_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
        """acc += the product of one [BLOCK_N, BLOCK_K] weight tile and one [BLOCK_M, BLOCK_K] x tile."""
        if F16_DOT:
            # x_scale is a runtime value on purpose: with a constant, Triton rounds x to fp16 first and
            # scales after, which overflows for |x| > 65504 (seen in the PTX).
            acc = tl.dot((a.to(tl.float32) * x_scale).to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        elif USE_DOT:
            w = w.to(a.dtype)  # fp8 -> bf16/fp16 is exact; a no-op for 16-bit weights
            if SWAP_AB:
                if DOT_IEEE:
                    acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, tl.trans(a), acc)
            else:
                if DOT_IEEE:
                    acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(w), acc)
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * a.to(tl.float32)
        else:
            acc += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        return acc

    @triton.jit
    def _finish(acc, S, B, rn_c, x_scale, W_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, rstd, NORM: tl.constexpr):
        """The output tile in float32: 1/rms (NORM), the channel scales (fp8), the bias."""
        if NORM:  # each row's 1 / rms, which factors out of the K sum
            acc = acc * rstd[:, None]
        if W_FP8:
            acc = acc * (tl.load(S + rn_c) / x_scale)[None, :]  # x_scale: dotH's 2**-8, else 1 (exact)
        if HAS_BIAS:
            acc = acc + tl.load(B + rn_c).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _mul_rn(a, b, EXACT: tl.constexpr):
        # A product the compiler cannot contract into a multiply-add with the sum after it (PTX mul.rn):
        # the rotation then rounds as torch's and rotary_cache_write's (which runs without contraction).
        if EXACT:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return a * b

    @triton.jit
    def _store_rope(acc, Y, rm, rm_c, rn, M, N, stride_ym, CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs,
                    s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HALF: tl.constexpr, CACHE_BLOCK: tl.constexpr, KV_SCALED: tl.constexpr,
                    EXACT_MUL: tl.constexpr):
        """ROPE's store: the tile's columns are (d, d + HALF) pairs of one head (see the kernel); q and k are
        rotated at each row's position, k and v also written to the cache at its slot (negative: none), as
        ``rotary_cache_write`` does with the rounded qkv output."""
        y = acc.to(Y.dtype.element_ty).to(tl.float32)  # the qkv output rotary_cache_write would read
        x1, x2 = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
        c1, c2 = tl.split(tl.reshape(rn, (BLOCK_N // 2, 2)))
        d = c1 % (2 * HALF)
        pos = tl.load(POS + rm_c).to(tl.int64)
        cs = CS + pos[:, None] * s_cs + d[None, :]
        cos = tl.load(cs)
        sin = tl.load(cs + HALF)
        r1 = _mul_rn(x1, cos, EXACT_MUL) - _mul_rn(x2, sin, EXACT_MUL)
        r2 = _mul_rn(x2, cos, EXACT_MUL) + _mul_rn(x1, sin, EXACT_MUL)
        rot = (c1 < q_cols + kv_cols)[None, :]
        rows = (rm < M)[:, None]
        yrow = Y + rm.to(tl.int64)[:, None] * stride_ym
        ok = rows & (c1 < N)[None, :]
        tl.store(yrow + c1[None, :], tl.where(rot, r1, x1).to(Y.dtype.element_ty), mask=ok)
        tl.store(yrow + c2[None, :], tl.where(rot, r2, x2).to(Y.dtype.element_ty), mask=ok)
        slot = tl.load(SLOT + rm_c)
        cached = ok & (slot >= 0)[:, None]
        blk = (slot // CACHE_BLOCK).to(tl.int64)[:, None]
        row = (slot % CACHE_BLOCK).to(tl.int64)[:, None]
        is_k = (c1 >= q_cols) & (c1 < q_cols + kv_cols)
        is_v = c1 >= q_cols + kv_cols
        kh = ((c1 - q_cols) // (2 * HALF))[None, :]
        vh = ((c1 - q_cols - kv_cols) // (2 * HALF))[None, :]
        k1, k2, v1, v2 = r1, r2, x1, x2
        if KV_SCALED:
            k1, k2, v1, v2 = quantize_kv(k1, k2, v1, v2, KVS)
        k_dst = KC + blk * s_kcb + row * s_kcs + kh * s_kch + d[None, :]
        tl.store(k_dst, k1.to(KC.dtype.element_ty), mask=cached & is_k[None, :])
        tl.store(k_dst + HALF, k2.to(KC.dtype.element_ty), mask=cached & is_k[None, :])
        v_dst = VC + blk * s_vcb + row * s_vcs + vh * s_vch + d[None, :] * s_vcd
        tl.store(v_dst, v1.to(VC.dtype.element_ty), mask=cached & is_v[None, :])
        tl.store(v_dst + HALF * s_vcd, v2.to(VC.dtype.element_ty), mask=cached & is_v[None, :])

    @triton.jit
    def _store(acc, Y, rm, rm_c, rn, M, N, stride_ym, CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs,
               s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               ROPE: tl.constexpr, HALF: tl.constexpr, CACHE_BLOCK: tl.constexpr, KV_SCALED: tl.constexpr,
               EXACT_MUL: tl.constexpr):
        if ROPE:
            _store_rope(acc, Y, rm, rm_c, rn, M, N, stride_ym, CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs,
                        s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, BLOCK_M, BLOCK_N, HALF, CACHE_BLOCK,
                        KV_SCALED, EXACT_MUL)
        else:
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)

    # The step's positions and slots are slices of one packed input buffer (see rotary_cache_write).
    @triton.jit(do_not_specialize=["M", "per_split", "POS", "SLOT"])
    def _skinny_kernel(X, W, S, B, Y, WS, LOCKS, M, N, K, per_split, stride_xm, stride_ym, x_scale,
                       R, RO, NW, WSQ, eps, stride_rm, stride_rom,
                       CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                       s_vcd,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr, F16_DOT: tl.constexpr,
                       W_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                       EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_IEEE: tl.constexpr,
                       NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False,
                       ROPE: tl.constexpr = False, HALF: tl.constexpr = 1, CACHE_BLOCK: tl.constexpr = 1,
                       KV_SCALED: tl.constexpr = False, EXACT_MUL: tl.constexpr = False,
                       PF_LINES: tl.constexpr = 0, PF_PAD: tl.constexpr = 1, LINE_ELEMS: tl.constexpr = 64,
                       PDL: tl.constexpr = False, UNROLL: tl.constexpr = 1):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if ROPE:
            # Column tiles of (d, d + HALF) pairs of one head, interleaved: the epilogue rotates each pair.
            # Each weight row is its own contiguous run, so the loads coalesce as with adjacent rows.
            j = tl.arange(0, BLOCK_N)
            g = pid_n * (BLOCK_N // 2) + j // 2
            rn = (g // HALF) * (2 * HALF) + g % HALF + (j % 2) * HALF
        else:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past M or N re-read the last real row instead of being masked:
        # the loads stay unpredicated (and pipelinable); those rows are never stored.
        rm_c = tl.minimum(rm, M - 1)
        rn_c = tl.minimum(rn, N - 1)
        rk = tl.arange(0, BLOCK_K)
        x_rows = X + rm_c.to(tl.int64)[:, None] * stride_xm
        w_rows = W + rn_c.to(tl.int64)[:, None] * K  # int64: lm_head-sized N * K passes 2**31 elements
        it0 = pid_k * per_split
        it1 = tl.minimum(it0 + per_split, tl.cdiv(K, BLOCK_K))

        if USE_DOT:
            if SWAP_AB:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        elif BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        if NORM:
            # The RMSNorm before this linear, fused (norm_linear): the residual add and the sum of squares
            # ride along the operand loads; programs of the first column tile store the new residual.
            r_rows = R + rm_c.to(tl.int64)[:, None] * stride_rm
            ro_rows = RO + rm.to(tl.int64)[:, None] * stride_rom
            store_res = rm[:, None] < tl.where(pid_n == 0, M, 0)  # rows < M, in column tile 0 only
            ssq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            a_dtype: tl.constexpr = X.dtype.element_ty if (USE_DOT and not F16_DOT) else None

        start = it0
        if PDL:
            # The first weight tile is loaded before waiting on the kernel that produces x (weights never
            # change): it is in flight while that kernel finishes (engine/pdl.py).
            offs_k = it0 * BLOCK_K + rk
            w = _load_w(w_rows, offs_k, K, EVEN_K)
            if PF_LINES > 0:  # the rest of the slice streams into L2 during the wait
                _prefetch_l2(w_rows, it0 * BLOCK_K, K, PF_LINES, PF_PAD, LINE_ELEMS)
            wait_for_producer(PDL, False)
            if NORM:
                a, ssq = _load_normed(x_rows, r_rows, ro_rows, NW, offs_k, K, ssq, store_res, EVEN_K, HAS_RES,
                                      a_dtype)
            else:
                a = _load_x(x_rows, offs_k, K, EVEN_K, SILU_MUL)
            acc = _mac(acc, w, a, x_scale, BLOCK_M, USE_DOT, SWAP_AB, F16_DOT, DOT_IEEE)
            start = it0 + 1
        elif PF_LINES > 0:
            _prefetch_l2(w_rows, it0 * BLOCK_K, K, PF_LINES, PF_PAD, LINE_ELEMS)
        for it in tl.range(start, it1, num_stages=NUM_STAGES, loop_unroll_factor=UNROLL):
            offs_k = it * BLOCK_K + rk
            w = _load_w(w_rows, offs_k, K, EVEN_K)
            if NORM:
                a, ssq = _load_normed(x_rows, r_rows, ro_rows, NW, offs_k, K, ssq, store_res, EVEN_K, HAS_RES,
                                      a_dtype)
            else:
                a = _load_x(x_rows, offs_k, K, EVEN_K, SILU_MUL)
            acc = _mac(acc, w, a, x_scale, BLOCK_M, USE_DOT, SWAP_AB, F16_DOT, DOT_IEEE)

        # The next kernel may launch once every program is past its main loop. Released right after the
        # wait instead, the Qwen2.5-7B bf16 decode chain ran 12% slower than without PDL (3.71 against
        # 3.33 ms; released here: 3.28; H200, 2026-12-04): the early programs of the next kernel take the
        # free slots of whichever SMs have them during this kernel's tail (our reading, not measured).
        release_dependents(PDL)
        if USE_DOT:
            if SWAP_AB:
                acc = tl.trans(acc)
        elif BLOCK_M == 1:
            acc = tl.sum(acc, axis=1)[None, :]
        else:
            acc = tl.sum(acc, axis=2)
        if NORM:
            ssq_m = tl.sum(ssq, axis=1)  # this split's share of each row's sum of squares

        if SPLIT:
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            ws_rows = WS + (pid_k * M + rm.to(tl.int64))[:, None] * N
            tl.store(ws_rows + rn[None, :], acc, mask=mask)
            if NORM:  # [split, column tiles, M]: every tile's last arriver reads its own tile's shares
                tl.store(WSQ + (pid_k * tl.num_programs(0) + pid_n) * M + rm, ssq_m, mask=rm < M)
            # Every thread's partial is issued before the (single-thread) release below.
            tl.debug_barrier()
            lock = LOCKS + pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) - 1:
                tl.debug_barrier()
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(0, tl.num_programs(1)):
                    # .cg: read from L2, past any stale L1 line of another call's partials.
                    total += tl.load(WS + (s * M + rm.to(tl.int64))[:, None] * N + rn[None, :], mask=mask, other=0.0,
                                     cache_modifier=".cg")
                rstd_t = x_scale  # unused without NORM
                if NORM:
                    ssq_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    for s in range(0, tl.num_programs(1)):
                        ssq_t += tl.load(WSQ + (s * tl.num_programs(0) + pid_n) * M + rm, mask=rm < M, other=0.0,
                                         cache_modifier=".cg")
                    rstd_t = 1.0 / tl.sqrt(ssq_t / K + eps)
                total = _finish(total, S, B, rn_c, x_scale, W_FP8, HAS_BIAS, rstd_t, NORM)
                _store(total, Y, rm, rm_c, rn, M, N, stride_ym, CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs,
                       s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, BLOCK_M, BLOCK_N, ROPE, HALF, CACHE_BLOCK,
                       KV_SCALED, EXACT_MUL)
                tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")  # ready for the next call / graph replay
        else:
            rstd = x_scale  # unused without NORM
            if NORM:
                rstd = 1.0 / tl.sqrt(ssq_m / K + eps)  # fused_ops' rms_norm formula
            acc = _finish(acc, S, B, rn_c, x_scale, W_FP8, HAS_BIAS, rstd, NORM)
            _store(acc, Y, rm, rm_c, rn, M, N, stride_ym, CS, POS, SLOT, KC, VC, KVS, q_cols, kv_cols, s_cs,
                   s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, BLOCK_M, BLOCK_N, ROPE, HALF, CACHE_BLOCK,
                   KV_SCALED, EXACT_MUL)
