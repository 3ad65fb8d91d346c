"""Triton kernels for paged attention, each with a thin launcher.

1. ``rotary_cache_write``: rotate-half rotary on q and k at each token's
   position, and the write of rotated k and raw v into the paged caches at
   ``slot_mapping``: one pass over the step's q/k/v.
2. ``paged_prefill``: varlen queries with lower-right causal masking over
   the cached keys. A tile's rows are (query token, head of the KV group)
   pairs, so K/V tiles are again loaded once per group, and the grid is a
   flat list of query tiles (no programs for the padding of short sequences).

Layouts are those of ``metadata.py``: cache ``[num_blocks, block_size,
num_kv_heads, head_dim]`` (K with a contiguous head_dim; V with any strides,
so a key-contiguous V block can be passed as a permuted view), tokens ``[T, heads, head_dim]`` with unit stride
in the last dim. Softmax runs in float32 in the exp2 domain. Grids are sized
from host ints only; no launcher reads a device tensor.

An fp8 cache (``kv_quant.py``) comes with ``kv_scale`` ([k_scale, v_scale]
float32 on the device, read by the kernels: nothing host-side to bake into
a CUDA graph). The write divides by the scale (IEEE division, as torch),
saturates at +-448 and rounds to nearest even; reads convert tiles to fp16
(exact for every e4m3 value; the query follows) and fold the K scale into
the softmax scale and the V scale into the final normalisation.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import pdl
from ..pdl import wait_for_producer
from .kv_quant import FP8_MAX, checked_scale

LOG2E = 1.4426950408889634
_FP8_MAX = tl.constexpr(FP8_MAX)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise go through TF32 on the GPU (about 1e-3
    # relative error); bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernels, got {head_dim}")


def check_k_cache(k_cache: torch.Tensor) -> None:
    """The K cache's head_dim must be contiguous (the V cache may have any strides: the kernels take all four,
    e.g. a key-contiguous V, ``[num_blocks, kv_heads, head_dim, block_size]`` permuted to the logical layout)."""
    if k_cache.dim() != 4 or k_cache.stride(3) != 1:
        raise ValueError(f"the K cache must be [num_blocks, block_size, kv_heads, head_dim] with a contiguous "
                         f"head_dim, got shape {tuple(k_cache.shape)} and strides {k_cache.stride()}")


def v_key_run(v_cache: torch.Tensor, tile: int) -> int:
    """Keys per run of adjacent V elements that the decode and prefill kernels may assume (their ``V_KEYS``): the
    tile's keys within one block (min(tile, block_size)) when the V cache is key-contiguous (unit key
    stride) and every other stride is a multiple of it; else 0 (the kernel assumes nothing)."""
    run = min(tile, v_cache.shape[1])
    if v_cache.stride(1) != 1 or v_cache.shape[1] == 1:
        return 0
    return run if all(v_cache.stride(i) % run == 0 for i in (0, 2, 3)) else 0


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def fp8_tile_convert(device: torch.device) -> bool:
    """Whether ``_fp8_to_f16``'s inline asm runs on ``device``: cvt.rn.f16x2.e4m3x2 is PTX for sm_89+; the
    interpreter (CPU tensors) and ROCm take Triton's cast."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 9))


@functools.lru_cache(maxsize=None)
def fp8_mma_runs(device: torch.device) -> bool:
    """Whether a ``tl.dot`` of two e4m3 tiles compiles for ``device``: NVIDIA sm_89+ (fp8 tensor cores), and the
    interpreter (CPU tensors), which computes it in float32."""
    return device.type == "cpu" or fp8_tile_convert(device)


@triton.jit
def _fp8_to_f16(x, ASM: tl.constexpr):
    # e4m3 -> fp16 is exact. With ASM the conversion is one PTX instruction per pair, done in the layout
    # the tile was loaded in, before Triton moves the tile into the dot's operand layout through shared
    # memory (as fp16, with ldmatrix). Triton's own cast is instead moved past that layout change, where
    # an 8-bit V tile (the [keys, head_dim] operand of P @ V, transposed for the MMA) is read from shared
    # memory one byte per instruction: sm_90 SASS of the decode loop (Triton 3.6, bench/kernel_sass.py),
    # 64-key tile, 657 instructions with the cast against 388 with ASM (bf16: 387). The asm is not pure so that
    # Triton cannot move it across the layout change either.
    if ASM:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16,
            is_pure=False, pack=4)
    else:
        return x.to(tl.float16)


# --------------------------------------------------------------------------
# 1. Rotary + KV-cache write
# --------------------------------------------------------------------------


@triton.jit
def quantize_kv(k1, k2, v1, v2, KV_SCALE):
    """Two halves each of rotated keys and of values (float32) as an fp8 cache stores them: divided by the
    layer's [k_scale, v_scale] (``_quantize``), saturated. Also the skinny GEMM's rope epilogue's."""
    k_scale, k_inv = _scale_at(KV_SCALE, 0)
    v_scale, v_inv = _scale_at(KV_SCALE, 1)
    return (_quantize(k1, k_scale, k_inv), _quantize(k2, k_scale, k_inv), _quantize(v1, v_scale, v_inv),
            _quantize(v2, v_scale, v_inv))


@triton.jit
def _scale_at(KV_SCALE, i: tl.constexpr):
    """The layer's k (i = 0) or v (i = 1) scale and its correctly rounded reciprocal, as ``_quantize`` takes them."""
    scale = tl.load(KV_SCALE + i)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _quantize(x, scale, inv_scale):
    # kv_quant.quantize: IEEE division, then saturation. ``inv_scale`` is div_rn(1, scale), the correctly
    # rounded reciprocal; one multiply and Markstein's correction (remainder by an exact fma, then
    # q + r / scale) give the correctly rounded quotient, as CUDA's own div.rn.f32 does on its fast path
    # (bench/fp8_quantize_division.py checks it against IEEE division, near-ties included). div_rn itself
    # per element compiled to a branchy sequence with a slow-path call (sm_90 SASS: 1,312 instructions per
    # program against 600 for a bf16 cache); plain `/` is div.full.f32, up to 2 ulp off, which the H200
    # showed storing 18 where torch's cast stores 20 (a quotient at their 19.0 tie). Quotients beyond
    # twice the clamp keep the plain product: there the correction could overflow to NaN, and the clamp
    # gives 448 either way.
    q0 = x * inv_scale
    q1 = tl.fma(tl.fma(-q0, scale, x), inv_scale, q0)
    q = tl.where(tl.abs(q0) <= 2 * _FP8_MAX, q1, q0)
    return tl.clamp(q, -_FP8_MAX, _FP8_MAX)


@triton.jit
def _head_rms_norm(x1, x2, W, eps, HALF: tl.constexpr, DTYPE: tl.constexpr):
    # fused_ops.rms_norm per head, its rounding points kept: the normalised value is rounded to the
    # model dtype, multiplied by the weight in float32, and the product rounded again.
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    offs_d = tl.arange(0, HALF)
    w1 = tl.load(W + offs_d).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + offs_d).to(tl.float32)[None, :]
    y1 = ((x1 * rstd[:, None]).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
    y2 = ((x2 * rstd[:, None]).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    return y1, y2


# The step's positions and slots are slices of one packed input buffer: their addresses' alignment
# changes with the step's size, and a pointer specialized on it would compile a variant mid-job.
@triton.jit(do_not_specialize=["positions", "slot_mapping", "T"])
def _rotary_cache_write_kernel(
    Q, K, V, QO, KC, VC, cos_sin, positions, slot_mapping, KV_SCALE, QW, KW, eps, T,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_qot, s_qoh,
    s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd, s_cs,
    H: tl.constexpr, KVH: tl.constexpr, NUM_Q_BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, KV_SCALED: tl.constexpr,
    QK_NORM: tl.constexpr, BLOCK_KVH: tl.constexpr, PDL: tl.constexpr = False, V_TILE: tl.constexpr = 0,
):
    wait_for_producer(PDL)
    if V_TILE:
        # A flat grid: T x (q + kv head blocks) programs as below, whose kv programs write K only, then one
        # program per V_TILE consecutive tokens and kv head writing V (_write_v_tile).
        pid = tl.program_id(0)
        heads_blocks: tl.constexpr = NUM_Q_BLOCKS + tl.cdiv(KVH, BLOCK_KVH)
        if pid >= T * heads_blocks:
            _write_v_tile(V, VC, KV_SCALE, slot_mapping, T, pid - T * heads_blocks, s_vt, s_vh,
                          s_vcb, s_vcs, s_vch, s_vcd, KVH, BLOCK_SIZE, 2 * HALF, V_TILE, KV_SCALED)
            return
        tok = pid // heads_blocks
        hb = pid % heads_blocks
    else:
        tok = tl.program_id(0)
        hb = tl.program_id(1)
    pos = tl.load(positions + tok)
    offs_d = tl.arange(0, HALF)
    offs_h = tl.arange(0, BLOCK_H)
    cos = tl.load(cos_sin + pos * s_cs + offs_d)[None, :]
    sin = tl.load(cos_sin + pos * s_cs + HALF + offs_d)[None, :]
    if hb < NUM_Q_BLOCKS:
        heads = hb * BLOCK_H + offs_h
        hmask = (heads < H)[:, None]
        src = Q + tok * s_qt + heads[:, None] * s_qh + offs_d[None, :]
        x1 = tl.load(src, mask=hmask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=hmask, other=0.0).to(tl.float32)
        if QK_NORM:
            x1, x2 = _head_rms_norm(x1, x2, QW, eps, HALF, Q.dtype.element_ty)
        dst = QO + tok * s_qot + heads[:, None] * s_qoh + offs_d[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(QO.dtype.element_ty), mask=hmask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(QO.dtype.element_ty), mask=hmask)
    else:
        _rotate_write_kv(K, V, KC, VC, KV_SCALE, KW, eps, tok, hb - NUM_Q_BLOCKS, slot_mapping, cos, sin, offs_d,
                         s_kt, s_kh, s_vt, s_vh, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd,
                         KVH, BLOCK_SIZE, HALF, BLOCK_KVH, KV_SCALED, QK_NORM, V_TILE == 0)


@triton.jit
def _write_v_tile(V, VC, KV_SCALE, slot_mapping, T, idx, s_vt, s_vh, s_vcb, s_vcs, s_vch, s_vcd,
                  KVH: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, V_TILE: tl.constexpr,
                  KV_SCALED: tl.constexpr):
    # V of V_TILE consecutive tokens of one kv head, for a key-contiguous V cache (a block's bytes are
    # [kv_heads, head_dim, block_size]). Written token by token, each of a token's head_dim bytes is a memory
    # sector of its own. Where the tile's tokens have consecutive slots in one block (a prompt filling it),
    # the store's addresses are written as that run, which Triton can see: a warp's lanes then walk the
    # tokens, adjacent bytes of one head_dim row (bench/kernel_sass.py --store-layouts). Other tiles store
    # element by element. The values and their rounding are _rotate_write_kv's (quantize_kv's V half).
    # In head_dim chunks of 1,024 elements a tile: a whole [64, 128] tile held 64 values and 64 pointers a
    # thread (sm_90: 255 registers and spills, for every program of the kernel).
    DC: tl.constexpr = min(D, max(16, 1024 // V_TILE))
    tile = idx // KVH
    head = idx % KVH
    lane = tl.arange(0, V_TILE)
    offs_t = tile * V_TILE + lane
    tmask = offs_t < T
    slot = tl.load(slot_mapping + offs_t, mask=tmask, other=-1)
    first = tl.load(slot_mapping + tile * V_TILE)
    in_order = tl.sum((slot == first + lane).to(tl.int32)) == V_TILE
    run = (first >= 0) & (first % BLOCK_SIZE + V_TILE <= BLOCK_SIZE) & in_order
    run_dst = VC + (first // BLOCK_SIZE).to(tl.int64) * s_vcb + (first % BLOCK_SIZE) * s_vcs + head * s_vch
    dst_t = VC + (slot // BLOCK_SIZE).to(tl.int64) * s_vcb + (slot % BLOCK_SIZE) * s_vcs + head * s_vch
    wmask = (slot >= 0)[:, None]
    src_t = V + offs_t.to(tl.int64) * s_vt + head * s_vh
    if KV_SCALED:
        v_scale, v_inv = _scale_at(KV_SCALE, 1)
    for d0 in tl.static_range(0, D, DC):
        offs_d = d0 + tl.arange(0, DC)
        v = tl.load(src_t[:, None] + offs_d[None, :], mask=tmask[:, None], other=0.0)
        if KV_SCALED:
            v = _quantize(v.to(tl.float32), v_scale, v_inv)
        v = v.to(VC.dtype.element_ty)
        if run:
            tl.store(run_dst + lane[:, None] * s_vcs + offs_d[None, :] * s_vcd, v)
        else:
            tl.store(dst_t[:, None] + offs_d[None, :] * s_vcd, v, mask=wmask)


@triton.jit
def _rotate_write_kv(K, V, KC, VC, KV_SCALE, KW, eps, tok, kb, slot_mapping, cos, sin, offs_d,
                     s_kt, s_kh, s_vt, s_vh, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, s_vcd,
                     KVH: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr,
                     KV_SCALED: tl.constexpr, QK_NORM: tl.constexpr, WRITE_V: tl.constexpr = True):
    # KV heads in blocks of their own size (a function of its own: the compiler refuses a name whose shape
    # differs between the kernel's two branches). In a block of the query heads' 16 rows Qwen2.5-7B's 4
    # (W-nano's 8) KV heads left 3/4 (1/2) of the rows, and of an fp8 write's divisions, masked.
    heads = kb * ROWS + tl.arange(0, ROWS)
    slot = tl.load(slot_mapping + tok)
    blk = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    hmask = (heads < KVH)[:, None]
    # A negative slot marks a padding token (e.g. a CUDA-graph batch
    # slot with no sequence): it is rotated for nothing and never stored.
    wmask = ((heads < KVH) & (heads * 0 + slot >= 0))[:, None]
    src = K + tok * s_kt + heads[:, None] * s_kh + offs_d[None, :]
    x1 = tl.load(src, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=hmask, other=0.0).to(tl.float32)
    if QK_NORM:
        x1, x2 = _head_rms_norm(x1, x2, KW, eps, HALF, K.dtype.element_ty)
    k1 = x1 * cos - x2 * sin
    k2 = x2 * cos + x1 * sin
    if WRITE_V:
        src = V + tok * s_vt + heads[:, None] * s_vh + offs_d[None, :]
        v1 = tl.load(src, mask=hmask, other=0.0)
        v2 = tl.load(src + HALF, mask=hmask, other=0.0)
        if KV_SCALED:
            k1, k2, v1, v2 = quantize_kv(k1, k2, v1.to(tl.float32), v2.to(tl.float32), KV_SCALE)
    elif KV_SCALED:  # V is _write_v_tile's
        k_scale, k_inv = _scale_at(KV_SCALE, 0)
        k1, k2 = _quantize(k1, k_scale, k_inv), _quantize(k2, k_scale, k_inv)
    k_dst = KC + blk * s_kcb + row * s_kcs + heads[:, None] * s_kch + offs_d[None, :]
    tl.store(k_dst, k1.to(KC.dtype.element_ty), mask=wmask)
    tl.store(k_dst + HALF, k2.to(KC.dtype.element_ty), mask=wmask)
    if WRITE_V:
        v_dst = VC + blk * s_vcb + row * s_vcs + heads[:, None] * s_vch + offs_d[None, :] * s_vcd
        tl.store(v_dst, v1.to(VC.dtype.element_ty), mask=wmask)
        tl.store(v_dst + HALF * s_vcd, v2.to(VC.dtype.element_ty), mask=wmask)


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    v_tile: int = 0,
) -> torch.Tensor:
    """Rotate q (into ``q_out``, which may be ``q`` itself) and k at ``positions``;
    write rotated k and raw v into the caches at ``slot_mapping`` (negative slots are skipped).
    An fp8 cache stores them divided by ``kv_scale`` ([k_scale, v_scale]). Returns the rotated q.
    ``qk_norm`` (q weight [D], k weight [D], eps): Qwen3's per-head RMSNorm of q and k first, in the
    same pass (two kernel launches per layer fewer than norming them apart).
    ``v_tile`` (a power of two, or 0): into a key-contiguous V cache, write V by tiles of that many
    consecutive tokens (``_write_v_tile``; for prefill, whose consecutive tokens fill blocks); the same
    bytes. Ignored for a V cache laid out like K."""
    T, H, D = q.shape
    KVH = k.shape[1]
    _check_head_dim(D)
    check_k_cache(k_cache)
    kv_scale = checked_scale(k_cache, kv_scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if q_out is None:
        q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if cos_sin.stride(-1) != 1 or cos_sin.dtype != torch.float32:
        cos_sin = cos_sin.float().contiguous()
    if T == 0:
        return q_out
    # Enough heads per program to move a few KiB; Qwen's 28 q heads take 2
    # programs per token, its 4 kv heads 1.
    block_h = min(triton.next_power_of_2(max(H, KVH)), max(1, 2048 // D))
    block_kvh = min(triton.next_power_of_2(KVH), block_h)
    nqb, nkb = triton.cdiv(H, block_h), triton.cdiv(KVH, block_kvh)
    if v_tile and v_cache.stride(1) == 1:
        if v_tile & (v_tile - 1):
            raise ValueError(f"v_tile must be a power of two, got {v_tile}")
        v_tile = min(v_tile, k_cache.shape[1])  # a run of consecutive slots ends with its block
        grid = (T * (nqb + nkb) + triton.cdiv(T, v_tile) * KVH,)
    else:
        v_tile, grid = 0, (T, nqb + nkb)
    _rotary_cache_write_kernel[grid](
        q, k, v, q_out, k_cache, v_cache, cos_sin, positions, slot_mapping,
        kv_scale if kv_scale is not None else cos_sin,  # unused for an unscaled cache
        *(qk_norm if qk_norm is not None else (cos_sin, cos_sin, 0.0)),  # unused without the norms
        T,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), cos_sin.stride(0),
        H=H, KVH=KVH, NUM_Q_BLOCKS=nqb, BLOCK_SIZE=k_cache.shape[1], HALF=D // 2, BLOCK_H=block_h,
        KV_SCALED=kv_scale is not None, QK_NORM=qk_norm is not None, BLOCK_KVH=block_kvh, V_TILE=v_tile,
        num_warps=4 if block_h * D >= 2048 else 2,
        # Unfused multiply-adds for the fp8 write: the rotated key then rounds exactly as torch's does,
        # so the stored fp8 bytes equal torch's cast (a 1-ulp fp32 difference can flip an fp8 rounding).
        enable_fp_fusion=kv_scale is None, **pdl.launch_kwargs(q.device),
    )
    return q_out


# --------------------------------------------------------------------------
# 2. Paged prefill / chunked prefill (varlen, lower-right causal)
# --------------------------------------------------------------------------


@triton.jit
def _attend_kv_range(
    acc, m, l, q, q_pos, bt_row, K, V, kv_off_k, kv_off_v, seq_len, lo, hi, qk_scale,
    s_kb, s_ks, s_vb, s_vs, s_vd,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
    V_KEYS: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        kv_pos = start + offs_n
        row = kv_pos % BLOCK_SIZE
        if MASKED:
            nmask = kv_pos < seq_len
            blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            k = tl.load(K + kv_off_k + blk[:, None] * s_kb + row[:, None] * s_ks + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)
        else:
            blk = tl.load(bt_row + kv_pos // BLOCK_SIZE).to(tl.int64)
            k = tl.load(K + kv_off_k + blk[:, None] * s_kb + row[:, None] * s_ks + offs_d[None, :])
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale
        if MASKED:
            s = tl.where((kv_pos[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # Padding rows can have no allowed key at all; keep them NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        if V_KEYS:
            # A key-contiguous V (s_vs == 1; tiles start on multiples of BLOCK_N): runs of V_KEYS adjacent
            # keys, which Triton cannot see through the loaded block ids (see the decode kernel). Loaded whole
            # even in masked tiles: a mask along the contiguous keys makes Triton load a byte at a time (sm_90
            # SASS, bench/kernel_sass.py: 1,226 instructions per masked tile against 874). Every address is in
            # the cache (past the sequence's blocks the table's masked load gives block 0); keys past the end
            # are zeroed after, since stale slots may hold NaN patterns (0 * NaN is NaN).
            v_off = kv_off_v + blk[:, None] * s_vb + row[:, None] * s_vs + offs_d[None, :] * s_vd
            # The hint inline: given inside a jit helper it is lost (sm_90 SASS: LDG.E.U8 again).
            v = tl.load(V + tl.max_contiguous(tl.multiple_of(v_off, [V_KEYS, 1]), [V_KEYS, 1]))
            if MASKED:
                v = tl.where(nmask[:, None], v.to(q.dtype), 0.0)
        elif MASKED:
            v = tl.load(V + kv_off_v + blk[:, None] * s_vb + row[:, None] * s_vs + offs_d[None, :] * s_vd,
                        mask=nmask[:, None], other=0.0)
        else:
            v = tl.load(V + kv_off_v + blk[:, None] * s_vb + row[:, None] * s_vs + offs_d[None, :] * s_vd)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
        m = m_new
    return acc, m, l


# Per-step sizes (the number of sequences, the block table's width) are not specialized on: each
# new divisibility pattern would compile another variant (~0.5 s) in the middle of a job.
@triton.jit(do_not_specialize=["block_tables", "seq_lens", "query_start_loc", "num_seqs", "search_steps", "s_bt"])
def _prefill_kernel(
    Q, K, V, O, block_tables, seq_lens, query_start_loc, KV_SCALE, qk_scale, num_seqs, search_steps,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_vd, s_ot, s_oh, s_bt,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    KV_SCALED: tl.constexpr, F16: tl.constexpr, V_KEYS: tl.constexpr = 0,
):
    # Reversed so that the last tiles of each sequence (the longest KV
    # ranges) start first and short ones fill the tail of the wave.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    # Sequence i owns the flat tiles [f(i), f(i+1)) with
    # f(i) = query_start_loc[i] // BLOCK_Q + i, at least cdiv(q_len_i, BLOCK_Q)
    # of them; f(num_seqs) is the grid size. Binary search for the owner.
    lo = pid * 0
    hi = lo + num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        f_mid = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        take = f_mid <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    seq = lo
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    q_tile = pid - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len

    # Row r of the tile is query token q_tile*BLOCK_Q + r // GROUP, head r % GROUP of the group.
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qi = q_tile * BLOCK_Q + offs_r // GROUP
    heads = kvh * GROUP + offs_r % GROUP
    row_ok = (offs_r < BLOCK_Q * GROUP) & (qi < q_len)
    q = tl.load(Q + (q_start + qi)[:, None] * s_qt + heads[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if F16:
        # An fp8 cache: its tiles become fp16 (exact; e4m3 -> bf16 goes through fp32), and so does q, once.
        # The wgmma path reads 8-bit tiles from shared memory well: the paired conversion of the decode
        # kernel gains nothing here (sm_90 SASS: 485 instructions per 64-key tile either way, 690 via bf16).
        q = q.to(tl.float16)
    q_pos = ctx + qi

    first = ctx + q_tile * BLOCK_Q  # position of the tile's first query
    last = ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    full_end = ((first + 1) // BLOCK_N) * BLOCK_N  # keys below it are visible to every row
    bt_row = block_tables + seq * s_bt
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(KV_SCALE)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, m, l = _attend_kv_range(acc, m, l, q, q_pos, bt_row, K, V, kvh * s_kh, kvh * s_vh, seq_len,
                                 0, full_end, qk_scale, s_kb, s_ks, s_vb, s_vs, s_vd,
                                 D, BLOCK_SIZE, BLOCK_N, False, PREC, V_KEYS)
    # Diagonal tiles; nothing past the tile's last query position is loaded.
    acc, m, l = _attend_kv_range(acc, m, l, q, q_pos, bt_row, K, V, kvh * s_kh, kvh * s_vh, seq_len,
                                 full_end, last + 1, qk_scale, s_kb, s_ks, s_vb, s_vs, s_vd,
                                 D, BLOCK_SIZE, BLOCK_N, True, PREC, V_KEYS)
    l_safe = tl.where(l == 0.0, 1.0, l)
    if KV_SCALED:
        out = acc * (tl.load(KV_SCALE + 1) / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    tl.store(O + (q_start + qi)[:, None] * s_ot + heads[:, None] * s_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


def prefill_block_m(block_m: int, group: int, max_query_len: int) -> int:
    """Rows of a prefill tile: (token, group head) pairs. Shrunk for short queries, grown if one group does
    not fit (also bench/kernel_sass.py's)."""
    return max(16, triton.next_power_of_2(group), min(block_m, triton.next_power_of_2(max_query_len * group)))


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_seqs: int,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention (lower-right aligned) of ``q`` over the paged cache,
    which already holds this step's keys. Any mix of query lengths, including 1.
    ``kv_scale``: [k_scale, v_scale] float32, required for an fp8 cache."""
    T, H, D = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    _check_head_dim(D)
    if H % KVH:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({KVH})")
    if block_n < 16 or block_n & (block_n - 1) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m and block_n must be powers of two >= 16, got {block_m}, {block_n}")
    check_k_cache(k_cache)
    kv_scale = checked_scale(k_cache, kv_scale)
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0 or num_seqs == 0:
        return out
    group = H // KVH
    block_m = prefill_block_m(block_m, group, max_query_len)
    block_q = block_m // group
    num_tiles = T // block_q + num_seqs
    f16 = kv_scale is not None and q.dtype != torch.float32
    _prefill_kernel[(num_tiles, KVH)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        kv_scale if kv_scale is not None else out, scale * LOG2E,  # out: a placeholder, unread without scales
        num_seqs, num_seqs.bit_length(),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, D=D, BLOCK_SIZE=BS, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        PREC=_dot_precision(q.dtype), KV_SCALED=kv_scale is not None, F16=f16,
        V_KEYS=v_key_run(v_cache, block_n), num_warps=num_warps, num_stages=num_stages,
    )
    return out
