"""Triton kernels (fused rotary + cache write, split-K decode, varlen prefill) against the torch reference.

On the CPU the kernels run in the Triton interpreter in float32 at tiny
shapes; the ``gpu`` class repeats the comparisons at Qwen2.5-7B sizes in bf16.
Unused cache blocks, the unwritten tail of each sequence's last block and the
block-table padding are poisoned (NaN, out-of-range ids): any read of them
shows up as a non-finite output or an out-of-bounds access.
"""
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attention_cases import DEV, PAD_BLOCK_ID, check, make_batch, reference  # noqa: E402
from pagedbatch.engine.attention.torch_ref import apply_rotary, rotary_for_positions  # noqa: E402
from pagedbatch.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedbatch.engine.attention.triton_decode import choose_num_splits, choose_num_splits_by_waves  # noqa: E402
from pagedbatch.engine.attention import triton_kernels  # noqa: E402
from pagedbatch.engine.attention.triton_kernels import rotary_cache_write  # noqa: E402

# ---------------------------------------------------------------- CPU (interpreter), float32


def test_rotary_cache_write_matches_reference_for_strided_q_and_skips_negative_slots():
    T, H, KVH, D, BS = 5, 4, 2, 32, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=1))  # strided views
    positions = torch.tensor([0, 3, 17, 40, 9])
    slots = torch.tensor([5, 33, -1, 2, 60])  # -1: padding token, must not be written
    kc = torch.full((4, BS, KVH, D), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    f = torch.arange(64).float()[:, None] / (10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    q_rot = rotary_cache_write(q, k, v, kc, vc, cos_sin, positions, slots)
    cos, sin = rotary_for_positions(cos_sin, positions)
    assert torch.allclose(q_rot, apply_rotary(q, cos, sin), atol=1e-6, rtol=0)
    k_rot = apply_rotary(k, cos, sin)
    keep = slots >= 0
    assert torch.allclose(kc.view(-1, KVH, D)[slots[keep]], k_rot[keep], atol=1e-6, rtol=0)
    assert torch.equal(vc.view(-1, KVH, D)[slots[keep]], v[keep])
    written = ~torch.isnan(kc.view(-1, KVH, D)).any(-1).any(-1)
    assert written.sum().item() == keep.sum().item()
    # In place: q_out may be q itself.
    q2 = q.clone()
    rotary_cache_write(q2, k, v, kc, vc, cos_sin, positions, slots, q_out=q2)
    assert torch.equal(q2, q_rot)


@pytest.mark.parametrize("v_tile,block_size", [(4, 16), (16, 8), (64, 16)])
def test_v_written_by_token_tiles_gives_the_same_cache_bytes_as_token_by_token(v_tile, block_size):
    """``v_tile`` (prefill into a key-contiguous fp8 V cache): V written a tile of consecutive tokens at a time
    must store the bytes of the token-by-token write, K and q too, across block boundaries, two sequences
    (one starting mid-block, one at slot 0), a padding token between them (slot -1: nothing written) and a
    last partial tile."""
    from pagedbatch.engine.attention import kv_quant

    T, H, KVH, D = 37, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g) * 4
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=1))
    a = torch.arange(21) + 3 * block_size + 5  # a sequence resuming mid-block
    b = torch.arange(15)  # a fresh one, from slot 0
    slots = torch.cat([a, torch.tensor([-1]), b])
    positions = torch.cat([torch.arange(21) + 5, torch.tensor([0]), torch.arange(15)])
    f = torch.arange(64).float()[:, None] / (10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    scale = torch.tensor([0.05, 0.03])
    caches = []
    for tile in (0, v_tile):
        cache = torch.full((2, 1, 8, block_size, KVH, D), 0x7F, dtype=torch.uint8).view(kv_quant.FP8_KV_DTYPE)
        (kc, vc), = kv_quant.layer_caches(cache, key_contiguous=True)
        assert vc.stride(1) == 1
        q_rot = rotary_cache_write(q, k, v, kc, vc, cos_sin, positions, slots, kv_scale=scale, v_tile=tile)
        caches.append((cache.view(torch.uint8), q_rot))
    (c0, q0), (c1, q1) = caches
    assert torch.equal(q0, q1)
    assert torch.equal(c0[0], c1[0]), "K bytes differ"
    assert torch.equal(c0[1], c1[1]), f"{(c0[1] != c1[1]).sum().item()} V bytes differ"
    # Both wrote what was asked: every token's V (stored in [kv_heads, head_dim, block_size] blocks) and
    # nothing else.
    v_blocks = c1[1, 0].view(8, KVH, D, block_size)
    written = (v_blocks != 0x7F).any(2).any(1).flatten()
    assert written.nonzero().flatten().tolist() == sorted(slots[slots >= 0].tolist())
    keep = slots >= 0
    got = v_blocks.permute(0, 3, 1, 2).reshape(-1, KVH, D)[slots[keep]].view(kv_quant.FP8_KV_DTYPE).float()
    # Each token's own values, loosely: the interpreter's fp8 cast is not the GPU's (it stored -127.95 as -64;
    # the GPU test pins the bytes), but a token or head written to another's place is caught.
    assert torch.allclose(got, (v[keep] / scale[1]).clamp(-448, 448), rtol=0.5, atol=2 ** -9)


def test_v_tile_must_be_a_power_of_two():
    from pagedbatch.engine.attention import kv_quant

    T, H, KVH, D = 4, 4, 2, 32
    q, k, v = torch.zeros(T, H, D), torch.zeros(T, KVH, D), torch.zeros(T, KVH, D)
    cache = torch.zeros((2, 1, 2, 16, KVH, D), dtype=kv_quant.FP8_KV_DTYPE)
    (kc, vc), = kv_quant.layer_caches(cache, key_contiguous=True)
    with pytest.raises(ValueError, match="power of two"):
        rotary_cache_write(q, k, v, kc, vc, torch.zeros(8, D), torch.arange(T), torch.arange(T),
                           kv_scale=torch.ones(2), v_tile=48)


def test_backend_writes_prefill_v_by_token_tiles_and_decode_token_by_token(monkeypatch):
    """Steps with prefill pass ``PREFILL_V_TILE`` (16: measured faster into the fp8 cache) to the cache write,
    decode-only steps 0 (one token a sequence: no run of slots to store along)."""
    from pagedbatch.engine.attention import triton_backend

    seen = []
    real = triton_backend.rotary_cache_write

    def spy(*a, **k):
        seen.append(k["v_tile"])
        return real(*a, **k)

    monkeypatch.setattr(triton_backend, "rotary_cache_write", spy)
    for ctx_lens, q_lens in (([0, 17], [5, 3]), ([9, 20], [1, 1])):
        b = make_batch(ctx_lens, q_lens, 4, 2, 32, 16, torch.float32)
        TritonAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, b.meta, 32**-0.5)
    assert seen == [16, 0]


def _near_fp8_ties(scale: float, n: int, g: torch.Generator) -> torch.Tensor:
    """float32 values whose quotients by ``scale`` lie within a few ulps of e4m3 rounding ties (and some
    random ones): where a quotient one ulp off stores a different byte."""
    from pagedbatch.engine.attention.kv_quant import FP8_KV_DTYPE

    grid = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # exactly representable: e4m3 has 3 mantissa bits
    x = (ties[torch.randint(len(ties), (n,), generator=g)] * scale).float()
    bits = x.view(torch.int32) + torch.randint(-3, 4, (n,), generator=g, dtype=torch.int32)
    x = bits.view(torch.float32)
    x[: n // 8] = torch.randn(n // 8, generator=g) * 500 * scale
    x[n // 8: n // 8 + 4] = torch.tensor([1e38, -1e38, 3.3e38, -3.3e38])  # quotients overflow: saturate
    return x


@triton.jit
def _quotients_kernel(X, OUT, SCALE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(SCALE)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(OUT + offs, triton_kernels._quantize(x, scale, tl.math.div_rn(1.0, scale)), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the saturating cases
@pytest.mark.parametrize("scale", [0.0371, 0.2, 1.0, 3.7e-3])
def test_fp8_cache_write_divides_exactly_as_ieee_near_rounding_ties(scale):
    """The fp8 write divides by the scale as a multiply by the correctly rounded reciprocal plus one
    correction (an exact fma remainder): the quotient must be IEEE division's even within an ulp of an
    e4m3 rounding tie, or a byte differs from torch's cast (the H200 once stored 18 for torch's 20 with an
    approximate division). Checked before the cast, which the interpreter does not round as the GPU does
    (DEVELOPERS.md); the GPU test of the whole write compares bytes
    (test_gpu_fp8_kernels_contexts_1_to_8192_with_bit_exact_writes)."""
    from pagedbatch.engine.attention.kv_quant import FP8_MAX

    g = torch.Generator().manual_seed(5)
    n = 4096
    x = _near_fp8_ties(scale, n, g)
    out = torch.empty_like(x)
    _quotients_kernel[(triton.cdiv(n, 1024),)](x, out, torch.tensor([scale]), n, BLOCK=1024)
    want = (x / torch.tensor(scale)).clamp(-FP8_MAX, FP8_MAX)
    assert torch.equal(out, want), f"{(out != want).sum().item()} of {n} quotients differ from IEEE division"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_cache_write_applies_qwen3_qk_norms_like_the_norm_kernel_then_rotary(dtype):
    """The fused per-head q/k RMSNorm: the same values as ``rms_norm`` followed by rotary; in bf16 the
    normed values keep rms_norm's rounding points (an unrounded product would differ by up to an ulp)."""
    from pagedbatch.engine.models.fused_ops import rms_norm_torch

    T, H, KVH, D, BS = 5, 4, 2, 32, 16
    g = torch.Generator().manual_seed(2)
    qkv = (torch.randn(T, (H + 2 * KVH) * D, generator=g) * 3).to(dtype)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=1))
    qw = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
    kw = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 9])
    slots = torch.tensor([5, 33, 1, 2, 60])
    kc = torch.full((4, BS, KVH, D), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    f = torch.arange(64).float()[:, None] / (10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    q_rot = rotary_cache_write(q, k, v, kc, vc, cos_sin, positions, slots, qk_norm=(qw, kw, 1e-6))
    cos, sin = rotary_for_positions(cos_sin, positions)
    qn, kn = rms_norm_torch(q, qw, 1e-6), rms_norm_torch(k, kw, 1e-6)
    assert qn.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    want_q = apply_rotary(qn.float(), cos, sin)
    assert (q_rot.float() - want_q).abs().max().item() <= tol * want_q.abs().max().item()
    want_k = apply_rotary(kn.float(), cos, sin)
    got_k = kc.view(-1, KVH, D)[slots].float()
    assert (got_k - want_k).abs().max().item() <= tol * want_k.abs().max().item()
    assert torch.equal(vc.view(-1, KVH, D)[slots], v)
    # Without the norms the same call is plain rotary: the norms are not a no-op on these inputs.
    plain = rotary_cache_write(q, k, v, kc.clone(), vc.clone(), cos_sin, positions, slots)
    assert (plain.float() - want_q).abs().max().item() > 0.1


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_contexts_spanning_several_blocks_and_splits(num_splits):
    # seq_lens 1, 18, 41 with 16-token blocks and 16-key tiles: up to 3 tiles, so 3 splits
    # leave some splits empty for the short sequences.
    check(ctx_lens=[0, 17, 40], q_lens=[1, 1, 1],
          backend=TritonAttentionBackend(num_splits=num_splits, decode_block_n=16))


def test_decode_block_size_32_group_4_head_dim_64_four_splits():
    check(ctx_lens=[5, 70, 129], q_lens=[1, 1, 1], heads=8, kv_heads=2, head_dim=64, block_size=32,
          backend=TritonAttentionBackend(num_splits=4, decode_block_n=16))


def test_decode_tile_spanning_several_small_blocks_with_odd_group():
    # 64-key tiles over 16-token blocks gather 4 block ids per tile; group of 3 heads padded to 16 rows.
    check(ctx_lens=[100, 3], q_lens=[1, 1], heads=6, kv_heads=2, block_size=16,
          backend=TritonAttentionBackend(num_splits=2, decode_block_n=64))


def test_decode_with_bucket_upper_bound_for_max_seq_len_gives_same_result():
    # A CUDA-graph bucket passes a max_seq_len bound; the kernel still uses each sequence's own length.
    backend = TritonAttentionBackend(decode_block_n=16)
    assert backend.decode_num_splits(3, 2, 512, "cpu") == 8  # more splits than the real lengths have tiles
    check(ctx_lens=[9, 33, 60], q_lens=[1, 1, 1], backend=backend, meta_max_seq_len=512)


def test_prefill_from_empty_cache():
    check(ctx_lens=[0, 0, 0], q_lens=[20, 33, 5])


def test_chunked_prefill_over_cached_context_block_size_32():
    check(ctx_lens=[30, 0, 45], q_lens=[18, 9, 40], block_size=32,
          backend=TritonAttentionBackend(prefill_block_m=32, prefill_block_n=16))


def test_mixed_batch_prefill_chunk_and_decode_rows():
    check(ctx_lens=[50, 7, 33], q_lens=[24, 1, 1],
          backend=TritonAttentionBackend(prefill_block_m=32, prefill_block_n=32))


def test_prefill_group_not_a_power_of_two_head_dim_64():
    # Group of 3: a 32-row tile holds 10 queries x 3 heads, 2 rows unused.
    check(ctx_lens=[13, 0], q_lens=[23, 12], heads=6, kv_heads=2, head_dim=64,
          backend=TritonAttentionBackend(prefill_block_m=32, prefill_block_n=16))


@pytest.mark.parametrize("tile", ["bm128 bn128 w8 st3", "bm128 bn64 w8 st2", "bm64 bn128 w4 st2"])
def test_prefill_tiles_larger_than_the_default_compute_the_same_attention(tile):
    # Prompts longer and shorter than one tile, over cached context, with a decode row: the diagonal and the
    # unmasked loops both run at each tile's size (group of 2: 64 or 32 query tokens a tile).
    backend = TritonAttentionBackend(prefill_tile=tile)
    assert str(backend.prefill_tile) == tile
    check(ctx_lens=[0, 70, 5, 130], q_lens=[150, 40, 1, 9], heads=4, kv_heads=2, backend=backend)


def test_prefill_tile_parses_its_string_form_and_refuses_others():
    from pagedbatch.engine.attention.prefill_tile import PrefillTile

    tile = PrefillTile.parse(" bm128 bn64 w8 st3 ")
    assert tile == PrefillTile(128, 64, 8, 3) and PrefillTile.parse(str(tile)) == tile
    assert TritonAttentionBackend().prefill_tile == PrefillTile()  # the default (prefill_tile.DEFAULT_PREFILL_TILE)
    small = TritonAttentionBackend(prefill_tile="bm128 bn128 w8 st3", prefill_block_m=32, prefill_block_n=16)
    assert small.prefill_tile == PrefillTile(32, 16, 8, 3)  # the test overrides keep warps and stages
    for bad, why in (("bm64 bn64 w4", "is written 'bm<rows> bn<keys> w<warps> st<stages>'"),
                     ("bm96 bn64 w4 st2", "block_m must be a power of two"),
                     ("bm8 bn64 w4 st2", "must be >= 16"), ("bm64 bn64 w4 st0", "num_stages must be >= 1")):
        with pytest.raises(ValueError, match=why):
            PrefillTile.parse(bad)


def test_engine_prefill_attention_config_reaches_the_backend_and_is_checked_at_config_time():
    from pagedbatch.config import EngineConfig
    from pagedbatch.engine.model_runner import make_backend

    backend = make_backend(EngineConfig(model="m", attention_backend="triton",
                                        prefill_attention_config="bm128 bn128 w8 st3"), torch.device("cpu"))
    assert str(backend.prefill_tile) == "bm128 bn128 w8 st3"
    with pytest.raises(ValueError, match="prefill_attention_config: a prefill attention tile is written"):
        EngineConfig(model="m", prefill_attention_config="128x128")
    with pytest.raises(ValueError, match="prefill_attention_config is a setting of the 'triton' attention backend"):
        EngineConfig(model="m", attention_backend="torch", prefill_attention_config="bm64 bn64 w4 st2")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_padding_row_with_zero_length_and_negative_slot_is_inert(num_splits):
    # A CUDA-graph batch padded past its real sequences: seq_len 0, slot -1, table all padding.
    b = make_batch([20, 40], [1, 1], 4, 2, 32, 16, torch.float32)
    scale = 32**-0.5
    ref, _, _ = reference(b, scale)
    m = b.meta
    meta = dataclasses.replace(
        m, num_seqs=3, num_tokens=3,
        positions=torch.cat((m.positions, m.positions.new_zeros(1))),
        slot_mapping=torch.cat((m.slot_mapping, m.slot_mapping.new_full((1,), -1))),
        query_start_loc=torch.arange(4, dtype=torch.int32, device=DEV),
        seq_lens=torch.cat((m.seq_lens, m.seq_lens.new_zeros(1))),
        block_tables=torch.cat((m.block_tables, torch.full_like(m.block_tables[:1], PAD_BLOCK_ID))))
    extra = lambda x: torch.cat((x, torch.randn_like(x[:1])))  # noqa: E731
    backend = TritonAttentionBackend(num_splits=num_splits, decode_block_n=16)
    got = backend.forward(extra(b.q), extra(b.k), extra(b.v), b.k_cache, b.v_cache, b.cos_sin, meta, scale)
    assert (got[:2] - ref).abs().max().item() <= 1e-5
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    written = ~torch.isnan(b.k_cache.view(-1, 2, 32)).any(-1).any(-1)
    assert torch.equal(written, b.expected_slots)


def test_decode_workspace_is_reused_across_calls():
    backend = TritonAttentionBackend(num_splits=2, decode_block_n=16)
    check(ctx_lens=[20, 40], q_lens=[1, 1], backend=backend)
    ptr = backend._workspace._buf.data_ptr()
    check(ctx_lens=[3, 50], q_lens=[1, 1], backend=backend, seed=1)
    assert backend._workspace._buf.data_ptr() == ptr


def test_num_splits_choice():
    assert choose_num_splits(64, 4, 100, 64) == 1  # short context: no split
    assert choose_num_splits(512, 4, 4096, 64) == 1  # batch alone fills the SMs
    assert choose_num_splits(1, 4, 4096, 64) == 16  # one long sequence: as many as allowed by length
    assert 1 < choose_num_splits(64, 4, 4096, 64) <= 4
    assert choose_num_splits(1, 1, 10**6, 64, max_splits=16) == 16


def test_num_splits_by_waves_never_spill_a_few_programs_into_another_wave():
    # 32 sequences x 4 KV heads of 8,192 keys, 4 programs per SM on 132 SMs (528 slots): 4 splits are 512
    # programs in one wave; the old rule's 5 (640) started a second wave (H200: 134.2 against 101.3 us).
    assert choose_num_splits(32, 4, 8192, 64, 132) == 5
    assert choose_num_splits_by_waves(32, 4, 8192, 64, 132, resident_per_sm=4) == 4
    assert choose_num_splits_by_waves(32, 4, 8192, 64, 132, resident_per_sm=3) == 3
    # A batch that fills every slot once already runs unsplit; a short context is not split below 4 tiles.
    assert choose_num_splits_by_waves(256, 8, 2048, 64, 132, resident_per_sm=3) == 1
    assert choose_num_splits_by_waves(8, 4, 4 * 64 * 2, 64, 132, resident_per_sm=4) == 2
    # One sequence: as many splits as allowed; between equal costs the fewest splits.
    assert choose_num_splits_by_waves(1, 4, 32768, 64, 132, resident_per_sm=4) == 16
    assert choose_num_splits_by_waves(64, 4, 4096, 64, 132, resident_per_sm=4) == 2  # 512 programs, one wave


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
@pytest.mark.parametrize("block_size", [16, 256])
def test_gqa_groups_head_dims_and_block_sizes_in_one_mixed_batch(head_dim, group, block_size):
    # One batch mixing a prefill from scratch, a chunk over cached context and decode rows from
    # 1 to a few hundred tokens of context (the interpreter is slow: the GPU class goes to 8,192).
    check(ctx_lens=[0, 37, 0, 1, 300], q_lens=[19, 12, 1, 1, 1], heads=2 * group, kv_heads=2, head_dim=head_dim,
          block_size=block_size, tol=2e-5, seed=group,
          backend=TritonAttentionBackend(num_splits=2 if group % 2 else None, decode_block_n=32,
                                         prefill_block_m=32, prefill_block_n=32))


# ---------------------------------------------------------------- GPU, bf16 at real sizes


@pytest.mark.gpu
class TestRealSizesBF16:
    """Qwen2.5-7B attention shape (28 q / 4 kv heads, head_dim 128); bf16 kernels vs the float32 reference
    on the same bf16 inputs. Tolerance: max abs error <= 2e-2 (outputs are O(1); bf16 has 8 mantissa bits)."""

    TOL = 2e-2
    SHAPE = dict(heads=28, kv_heads=4, head_dim=128, dtype=torch.bfloat16, tol=2e-2, cache_tol=2e-2)

    @pytest.mark.parametrize("block_size", [16, 256])
    def test_decode_batch_64_contexts_up_to_4096(self, block_size):
        g = torch.Generator().manual_seed(block_size)
        ctx = torch.randint(0, 4096, (64,), generator=g).tolist()
        ctx[:3] = [0, 4095, 255]
        check(ctx_lens=ctx, q_lens=[1] * 64, block_size=block_size, **self.SHAPE)
        check(ctx_lens=ctx[:4], q_lens=[1] * 4, block_size=block_size,
              backend=TritonAttentionBackend(num_splits=8), **self.SHAPE)

    @pytest.mark.parametrize("block_size", [16, 256])
    def test_prefill_and_mixed_batches(self, block_size):
        check(ctx_lens=[0, 200, 0, 1500, 3000], q_lens=[1024, 300, 77, 1, 1], block_size=block_size, **self.SHAPE)
        check(ctx_lens=[0] * 8, q_lens=[512] * 8, block_size=block_size, **self.SHAPE)

    def test_decode_replays_under_cuda_graph(self):
        b = make_batch([100, 2000, 3000, 50], [1] * 4, 28, 4, 128, 16, torch.bfloat16)
        scale = 128**-0.5
        backend = TritonAttentionBackend(num_splits=4)
        meta = b.meta
        static_q, static_k, static_v = b.q.clone(), b.k.clone(), b.v.clone()
        backend.forward(static_q, static_k, static_v, b.k_cache, b.v_cache, b.cos_sin, meta, scale)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = backend.forward(static_q, static_k, static_v, b.k_cache, b.v_cache, b.cos_sin, meta, scale)
        new_q = torch.randn_like(static_q)
        static_q.copy_(new_q)
        graph.replay()
        torch.cuda.synchronize()
        b.q = new_q
        ref, _, _ = reference(b, scale)
        assert (static_out.float() - ref).abs().max().item() <= self.TOL


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_matrix_contexts_1_to_8192_mixed_in_one_batch(dtype, head_dim, group, block_size):
    """Every combination the kernels must serve, at full context lengths. Tolerance (max abs error against
    the float32 reference on the same inputs): 1e-4 in float32 (IEEE dots, different summation order),
    2e-2 in bf16 (8 mantissa bits; outputs are O(1))."""
    g = torch.Generator().manual_seed(head_dim * group + block_size)
    decode_ctx = [0, 1, 8191, 4096, 255, 16] + torch.randint(2, 8192, (10,), generator=g).tolist()
    ctx = [0, 1000, 7000] + decode_ctx
    q = [700, 96, 33] + [1] * len(decode_ctx)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check(ctx_lens=ctx, q_lens=q, heads=4 * group, kv_heads=4, head_dim=head_dim, block_size=block_size,
          dtype=dtype, tol=tol, cache_tol=1e-5 if dtype == torch.float32 else 2e-2)
    check(ctx_lens=decode_ctx, q_lens=[1] * len(decode_ctx), heads=4 * group, kv_heads=4, head_dim=head_dim,
          block_size=block_size, dtype=dtype, tol=tol, cache_tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_gpu_prefill_kernel_compiles_one_variant_for_any_number_of_sequences_and_table_width():
    """A job's mixed steps vary the number of sequences and the block table's width every step; the
    kernel must not compile a variant per divisibility pattern of them (each is a ~0.5 s stall mid-job:
    W1 lost 1.2 s to two such compiles on 2026-12-03)."""
    from pagedbatch.engine.attention import triton_kernels
    from pagedbatch.engine.triton_variants import compiled_variants

    # Every batch has a query of >= 16 tokens, so the tile shape (a constexpr) is the same in all.
    batches = [([0], [40]), ([5] * 16, [17] * 16), ([3] * 17, [20] + [1] * 16), ([100] * 32, [16] * 32),
               ([300, 0], [33, 70]), ([17] * 5, [1, 1, 1, 1, 48])]
    counts = []
    for ctx, q in batches:
        check(ctx_lens=ctx, q_lens=q, heads=8, kv_heads=2, head_dim=128, dtype=torch.float32, tol=1e-4)
        counts.append(compiled_variants(triton_kernels._prefill_kernel))
    assert counts == [counts[0]] * len(counts), counts
