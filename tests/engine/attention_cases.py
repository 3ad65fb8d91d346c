"""Paged-attention test batches on poisoned caches, and their torch reference (shared by the kernel tests).

A module of its own, not conftest.py (see tests/jobs/job_helpers.py). Unused
cache blocks, the unwritten tail of each sequence's last block and the
block-table padding are poisoned (NaN, out-of-range ids): any read of them
shows up as a non-finite output or an out-of-bounds access.

fp8 caches (``kv_scale`` given) store the context quantized with torch's
cast; NaN poison survives quantization (e4m3fn has NaN).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from pagedbatch.engine.attention.kv_quant import FP8_KV_DTYPE, quantize
from pagedbatch.engine.attention.metadata import AttentionMetadata
from pagedbatch.engine.attention.torch_ref import TorchAttentionBackend

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PAD_BLOCK_ID = 2**30  # block-table padding: far out of range of every cache


@dataclasses.dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor  # poisoned: NaN everywhere no token has been written
    v_cache: torch.Tensor
    cos_sin: torch.Tensor
    meta: AttentionMetadata
    expected_slots: torch.Tensor  # [num_blocks * block_size] bool: slots holding a token after the write
    kv_scale: Optional[torch.Tensor] = None  # [k_scale, v_scale] float32 for an fp8 cache


def make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3,
               kv_scale=None) -> Batch:
    """Random q/k/v for the new tokens; a cache already holding each sequence's context under shuffled block ids.
    ``kv_scale`` (k_scale, v_scale): the cache is fp8 with those scales; q/k/v stay in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    # Block 0 is never assigned: it is where masked lanes of a gather land, so it must be poison too.
    ids = 1 + torch.randperm(num_blocks - 1, generator=g)
    width = max(need) + 2
    table = torch.full((B, width), PAD_BLOCK_ID, dtype=torch.int64)
    ctx_slots, new_slots, positions = [], [], []
    start = 0
    for i, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        table[i, : need[i]] = ids[start : start + need[i]]
        start += need[i]
        pos = torch.arange(c + n)
        slots = table[i, pos // block_size] * block_size + pos % block_size
        ctx_slots.append(slots[:c])
        new_slots.append(slots[c:])
        positions.append(pos[c:])
    ctx_slots, new_slots = torch.cat(ctx_slots), torch.cat(new_slots)

    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = []
    for i in range(2):
        cache = torch.full(shape, float("nan"))
        values = torch.randn(len(ctx_slots), kv_heads, head_dim, generator=g)
        cache.view(-1, kv_heads, head_dim)[ctx_slots] = values
        caches.append(cache.to(dtype) if kv_scale is None else quantize(cache, torch.tensor(kv_scale[i])))
    k_cache, v_cache = caches
    expected = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    expected[ctx_slots] = True
    expected[new_slots] = True

    T = sum(q_lens)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        positions=torch.cat(positions).to(DEV), slot_mapping=new_slots.to(DEV), query_start_loc=qsl.to(DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(DEV), block_tables=table.to(torch.int32).to(DEV),
        num_seqs=B, num_tokens=T, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype).to(DEV)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(DEV)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    f = torch.arange(max(seq_lens) + 1).float()[:, None] * inv[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1).to(DEV)
    scale_t = None if kv_scale is None else torch.tensor(kv_scale, dtype=torch.float32, device=DEV)
    return Batch(q, k, v, k_cache.to(DEV), v_cache.to(DEV), cos_sin, meta, expected.to(DEV), scale_t)


def clean(cache: torch.Tensor) -> torch.Tensor:
    """A copy with the NaN poison replaced by zeros (same dtype)."""
    if cache.dtype == FP8_KV_DTYPE:
        nan = torch.isnan(cache.float())
        out = cache.clone()
        out.view(torch.uint8)[nan] = 0
        return out
    return torch.nan_to_num(cache, nan=0.0)


def reference(b: Batch, scale: float):
    """Torch reference in float32 on a clean copy: the reference gathers whole padded rows (then masks them),
    so it gets zeros for unwritten slots and block 0 for table padding. An fp8 cache stays fp8: the reference
    writes the new tokens with torch's cast. Returns (output, k cache, v cache) after the reference's write."""
    kc, vc = clean(b.k_cache), clean(b.v_cache)
    if b.kv_scale is None:
        kc, vc = kc.float(), vc.float()
    bt = b.meta.block_tables
    meta = dataclasses.replace(b.meta, block_tables=torch.where(bt >= kc.shape[0], 0, bt))
    out = TorchAttentionBackend().forward(b.q.float(), b.k.float(), b.v.float(), kc, vc, b.cos_sin, meta, scale,
                                          b.kv_scale)
    return out, kc, vc


def check(ctx_lens, q_lens, heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, tol=1e-5,
          cache_tol=1e-6, backend=None, seed=0, meta_max_seq_len=None):
    from pagedbatch.engine.attention.triton_backend import TritonAttentionBackend

    b = make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, seed=seed)
    scale = head_dim**-0.5
    ref, kc_ref, vc_ref = reference(b, scale)
    assert torch.isfinite(ref).all()
    meta = b.meta if meta_max_seq_len is None else dataclasses.replace(b.meta, max_seq_len=meta_max_seq_len)
    backend = backend or TritonAttentionBackend()
    got = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, meta, scale)
    assert got.dtype == b.q.dtype and got.shape == b.q.shape
    got = got.float()
    assert torch.isfinite(got).all(), "read a poisoned (unused) cache slot"

    # The write landed exactly in the expected slots, with the reference's values.
    for cache, cache_ref in ((b.k_cache, kc_ref), (b.v_cache, vc_ref)):
        flat = cache.view(-1, *cache.shape[2:]).float()
        flat_ref = cache_ref.view(-1, *cache.shape[2:])
        assert torch.equal(~torch.isnan(flat).any(-1).any(-1), b.expected_slots), "cache write touched other slots"
        assert (flat[b.expected_slots] - flat_ref[b.expected_slots]).abs().max().item() <= cache_tol
    err = (got - ref).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"
    return backend
