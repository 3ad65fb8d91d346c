"""Triton paged attention against the torch reference (interpreter on CPU, real sizes on the GPU)."""
import dataclasses
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import
triton = pytest.importorskip("triton")

from pagedbatch.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pagedbatch.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from pagedbatch.engine.attention.triton_paged import TritonAttentionBackend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q/k/v for the new tokens, a cache already holding each sequence's context, shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    B = len(q_lens)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, i = [], 0
    for n in need:
        tables.append(ids[i : i + n])
        i += n
    width = max(need) + 2
    # Poison: unused blocks and table padding hold NaN / out-of-range ids must never be read.
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for t, s, c in zip(tables, seq_lens, ctx_lens):
        for p in range(c):
            k_cache[t[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[t[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    T = sum(q_lens)
    positions, slots = [], []
    for t, c, q in zip(tables, ctx_lens, q_lens):
        for p in range(c, c + q):
            positions.append(p)
            slots.append(t[p // block_size] * block_size + p % block_size)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    table_t = torch.full((B, width), 10**6, dtype=torch.int32)  # padding ids far out of range
    for r, t in enumerate(tables):
        table_t[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(
        positions=torch.tensor(positions).to(DEV), slot_mapping=torch.tensor(slots).to(DEV),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(DEV), block_tables=table_t.to(DEV),
        num_seqs=B, num_tokens=T, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype).to(DEV)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(DEV)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(DEV)
    max_pos = max(seq_lens) + 1
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    f = torch.arange(max_pos).float()[:, None] * inv[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1).to(DEV)
    return q, k, v, k_cache.to(DEV), v_cache.to(DEV), cos_sin, meta


def check(ctx_lens, q_lens, heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, tol=1e-4):
    q, k, v, kc, vc, cs, meta = make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    # The reference gathers whole padded rows (then masks them), so it gets a
    # clean copy: zeros for unused slots and block 0 as table padding. The
    # Triton kernels get the poisoned originals and must never touch them.
    ref_meta = dataclasses.replace(meta, block_tables=torch.where(meta.block_tables >= kc.shape[0], 0, meta.block_tables))
    kc_ref, vc_ref = torch.nan_to_num(kc, nan=0.0), torch.nan_to_num(vc, nan=0.0)
    ref = TorchAttentionBackend().forward(q, k, v, kc_ref, vc_ref, cs, ref_meta, scale).float()
    assert torch.isfinite(ref).all()
    got = TritonAttentionBackend().forward(q, k, v, kc, vc, cs, meta, scale).float()
    assert torch.isfinite(got).all(), "read a poisoned (unused) cache slot"
    written = ~torch.isnan(kc)
    assert torch.equal(kc[written], kc_ref[written]) and torch.equal(vc[~torch.isnan(vc)], vc_ref[~torch.isnan(vc)])
    assert written.sum() == (kc_ref != 0).sum(), "cache write touched other slots"
    err = (got - ref).abs().max().item()
    assert err <= tol, err


def test_decode_several_blocks_gqa():
    check(ctx_lens=[0, 17, 40], q_lens=[1, 1, 1])


def test_decode_block_size_32_group_4():
    check(ctx_lens=[5, 70], q_lens=[1, 1], heads=8, kv_heads=2, block_size=32)


def test_prefill_from_empty_cache():
    check(ctx_lens=[0, 0], q_lens=[20, 33])


def test_chunked_prefill_over_cached_context_and_mixed_decode_rows():
    check(ctx_lens=[30, 0, 45], q_lens=[18, 9, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
def test_real_sizes_bf16(block_size):
    # Qwen2.5-7B attention shape; bf16 against the fp32 reference on the same inputs.
    check(ctx_lens=[0, 300, 1000, 2047] * 4, q_lens=[1] * 16, heads=28, kv_heads=4, head_dim=128,
          block_size=block_size, dtype=torch.bfloat16, tol=2e-2)
    check(ctx_lens=[0, 200, 0, 1500], q_lens=[512, 300, 77, 1], heads=28, kv_heads=4, head_dim=128,
          block_size=block_size, dtype=torch.bfloat16, tol=2e-2)
