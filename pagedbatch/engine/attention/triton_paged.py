"""Triton paged attention: decode (GQA-grouped) and varlen prefill over the block table.

Both kernels read K/V straight from the paged cache
``[num_blocks, block_size, num_kv_heads, head_dim]`` through the block
table, with online softmax in float32. Grids are sized from host ints in
the metadata only, so the decode launch is CUDA-graph capturable (its loop
bound is each sequence's length, read on the device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_quant import is_scaled
from .metadata import AttentionMetadata
from .torch_ref import rotate_and_cache


@triton.jit
def _decode_kernel(Q, K, V, O, block_tables, seq_lens, scale,
                   s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + seq * s_qt + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for b in range(0, tl.cdiv(seq_len, BLOCK)):
        blk = tl.load(block_tables + seq * s_bt + b).to(tl.int64)
        kv_off = blk * s_kb + offs_n[:, None] * s_ks + kvh * s_kh + offs_d[None, :]
        valid = (b * BLOCK + offs_n) < seq_len
        # Masked loads: slots past the sequence's end may hold anything.
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / l[:, None]
    tl.store(O + seq * s_ot + heads[:, None] * s_oh + offs_d[None, :], out.to(O.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _prefill_kernel(Q, K, V, O, block_tables, seq_lens, query_start_loc, scale,
                    s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mt = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len
    kvh = h // GROUP
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < q_len
    q = tl.load(Q + (q_start + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mmask[:, None], other=0.0)
    q_pos = ctx + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(seq_len, ctx + (mt + 1) * BLOCK_M)  # causal: nothing past the tile's last query
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < seq_len
        blk = tl.load(block_tables + seq * s_bt + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        kv_off = blk[:, None] * s_kb + (offs_n % BLOCK_SIZE)[:, None] * s_ks + kvh * s_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=nmask[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        allowed = (offs_n[None, :] <= q_pos[:, None]) & nmask[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet (padding)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(O + (q_start + offs_m)[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None])


def _check_same_layout(k_cache, v_cache) -> None:
    # These kernels address V with K's strides.
    if v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("the triton-basic backend needs K and V caches of one layout with a contiguous head_dim "
                         f"(K strides {k_cache.stride()}, V strides {v_cache.stride()})")


def paged_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None):
    _check_same_layout(k_cache, v_cache)
    T, H, D = q.shape
    KVH, BS = k_cache.shape[2], k_cache.shape[1]
    group = H // KVH
    out = torch.empty_like(q) if out is None else out
    _decode_kernel[(meta.num_seqs, KVH)](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK=BS, num_warps=4, num_stages=2)
    return out


def paged_prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None, block_m: int = 64):
    _check_same_layout(k_cache, v_cache)
    T, H, D = q.shape
    KVH, BS = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    block_m = max(16, min(block_m, triton.next_power_of_2(meta.max_query_len)))
    block_n = 64  # key tiles gather rows through the block table, so any block size works
    grid = (triton.cdiv(meta.max_query_len, block_m), meta.num_seqs, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), meta.block_tables.stride(0),
        GROUP=H // KVH, D=D, BLOCK_SIZE=BS, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    return out


class TritonAttentionBackend:
    """Rotary and the cache write in torch; attention in Triton, reading K/V through the block table."""

    name = "triton-basic"

    def forward(self, q, k, v, k_cache, v_cache, cos_sin, meta: AttentionMetadata, scale: float,
                kv_scale=None) -> torch.Tensor:
        if is_scaled(k_cache):
            raise ValueError("attention_backend 'triton-basic' has no fp8 KV cache; use 'triton' or 'torch'")
        q = rotate_and_cache(q, k, v, k_cache, v_cache, cos_sin, meta)
        if meta.is_decode_only:
            return paged_decode(q, k_cache, v_cache, meta, scale)
        return paged_prefill(q, k_cache, v_cache, meta, scale)
