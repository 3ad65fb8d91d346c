"""Every decode configuration, and the fp8 KV cache in all three Triton kernels, against the torch reference.

CPU (interpreter, float32, tiny shapes): each named ``DECODE_CONFIGS`` entry
on a lanes-sized group and a tl.dot-sized one; fp8 reads on caches written
by torch's cast (the interpreter's own fp32 -> fp8 cast rounds ties away
from even and does not saturate), fp8 writes within one fp8 ulp of torch's.
GPU (bf16, head_dim 128): every configuration at real shapes, the fp8
kernels over contexts up to 8,192 with bit-exact writes, poisoned outputs.
"""
import dataclasses
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attention_cases import DEV, check, clean, make_batch, reference  # noqa: E402
from pagedbatch.engine.attention.torch_ref import (  # noqa: E402
    TorchAttentionBackend,
    apply_rotary,
    paged_attention_reference,
    rotary_for_positions,
    write_kv_cache,
)
from pagedbatch.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedbatch.engine.attention.triton_decode import (  # noqa: E402
    DECODE_CONFIGS,
    DEFAULT_DECODE_CONFIG,
    DecodeConfig,
    paged_decode,
    v_key_run,
)
from pagedbatch.engine.attention.triton_kernels import (  # noqa: E402
    _fp8_to_f16,
    fp8_tile_convert,
    rotary_cache_write,
)

SCALES = (0.03, 0.2)  # k, v: far from 1 and from each other, so a dropped or swapped scale shows


# ---------------------------------------------------------------- CPU (interpreter), float32


def _interpreter_distinct(names):
    """Configs whose kernels differ in more than num_warps/num_stages (which the interpreter ignores) or
    the split policy (host arithmetic, pinned by test_split_policies_of_the_named_configs)."""
    seen, out = set(), []
    for name in names:
        key = dataclasses.replace(DECODE_CONFIGS[name], num_warps=4, num_stages=1, programs_per_sm=4,
                                  min_tiles_per_split=4, max_splits=16)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


@pytest.mark.parametrize("name", _interpreter_distinct(DECODE_CONFIGS))
def test_every_decode_config_matches_reference(name):
    # Group 2 (multiply-add lanes in the lanes configs) over 32-token blocks, 2 splits; group 3 (tl.dot) over 16-token
    # blocks with the config's own split policy. Sequences of 18 and 71 keys: full tiles and a partial one.
    backend = TritonAttentionBackend(decode_config=name, num_splits=2)
    check(ctx_lens=[17, 70], q_lens=[1, 1], heads=2, kv_heads=1, block_size=32, backend=backend)
    check(ctx_lens=[70, 17], q_lens=[1, 1], heads=3, kv_heads=1, block_size=16,
          backend=TritonAttentionBackend(decode_config=name))


def test_split_policies_of_the_named_configs():
    def splits(name, batch, kv_heads, group, max_len):
        return DECODE_CONFIGS[name].num_splits(batch, kv_heads, group, max_len, num_sms=132)

    # W-nano's full batch (2,048 programs): no split unless asked for 16 programs per SM.
    assert splits("v2", 256, 8, 2, 40960) == 1 and splits("v2-pps16", 256, 8, 2, 40960) == 2
    # Batch 1 on the 7B shape under a CUDA-graph bound: as many as allowed, or as capped.
    assert splits("v2", 1, 4, 7, 32768) == 16 and splits("v2-nosplit", 1, 4, 7, 32768) == 1
    assert splits("v2-splits4", 1, 4, 7, 32768) == 4
    # Long contexts: enough programs for 4 per SM; the tile size sets the shortest split.
    assert splits("v2", 32, 4, 7, 32768) == 5 and splits("v2", 1, 4, 7, 600) == 2
    assert splits("v2-n128-w8", 1, 4, 7, 600) == 1


def test_lanes_path_serves_one_head_per_kv_head():
    # MHA (group 1): a [1, keys, head_dim] lanes state, scalar table entries (16-key tiles in 32-token blocks).
    check(ctx_lens=[40, 5], q_lens=[1, 1], heads=2, kv_heads=2, block_size=32,
          backend=TritonAttentionBackend(decode_config="v2-lanes", num_splits=2))


def test_default_decode_configs_exist_and_unknown_names_fail():
    assert all(name in DECODE_CONFIGS for name in DEFAULT_DECODE_CONFIG.values())
    with pytest.raises(ValueError, match="unknown decode config"):
        TritonAttentionBackend(decode_config="v9")
    with pytest.raises(ValueError, match="block_n"):
        DecodeConfig(block_n=48)
    with pytest.raises(ValueError, match="max_registers"):
        DecodeConfig(max_registers=300)


def test_a_register_capped_two_stage_config_computes_the_same_attention():
    """``v2-f8mma-s2-r80`` (2 stages, ``maxnreg`` 80: a compiler option, ignored by the interpreter) as a
    named config of the backend; its sm_90 build is checked on the GPU by bench/decode_attention.py."""
    check(ctx_lens=[40, 5], q_lens=[1, 1], heads=4, kv_heads=2, block_size=16,
          backend=TritonAttentionBackend(decode_config="v2-f8mma-s2-r80"))


def test_engine_decode_attention_config_selects_a_named_config_and_refuses_others():
    from pagedbatch.config import EngineConfig
    from pagedbatch.engine.model_runner import make_backend

    backend = make_backend(EngineConfig(model="m", attention_backend="triton", decode_attention_config="v2-n32"),
                           torch.device("cpu"))
    assert backend.decode_config(torch.bfloat16) == DECODE_CONFIGS["v2-n32"]
    default = make_backend(EngineConfig(model="m", attention_backend="triton"), torch.device("cpu"))
    assert default.decode_config(torch.bfloat16) == DECODE_CONFIGS[DEFAULT_DECODE_CONFIG[2]]
    with pytest.raises(ValueError, match="unknown decode config 'v9'"):
        make_backend(EngineConfig(model="m", attention_backend="triton", decode_attention_config="v9"),
                     torch.device("cpu"))
    with pytest.raises(ValueError, match="decode_attention_config is a setting of the 'triton' attention backend"):
        EngineConfig(model="m", attention_backend="torch", decode_attention_config="v2")


def _torch_written(b):
    """Write the batch's new tokens with torch (reference arithmetic, torch's cast) into b's poisoned caches;
    return the rotated queries."""
    cos, sin = rotary_for_positions(b.cos_sin, b.meta.positions)
    write_kv_cache(apply_rotary(b.k.float(), cos, sin), b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.kv_scale)
    return apply_rotary(b.q, cos, sin)


@pytest.mark.parametrize("name", ["v1", "v2", "v2-lanes", None], ids=["v1", "v2", "v2-lanes", "fp8-default"])
def test_fp8_decode_reads_torch_written_cache_with_scales(name):
    b = make_batch([0, 17, 40, 100], [1] * 4, 6, 2, 32, 16, torch.float32, kv_scale=SCALES)
    scale = 32**-0.5
    ref, _, _ = reference(b, scale)
    q_rot = _torch_written(b)
    for splits in (1, 3):
        out = torch.full_like(q_rot, float("nan"))
        paged_decode(q_rot, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, scale, splits,
                     out=out, config=name, kv_scale=b.kv_scale)
        assert (out - ref).abs().max().item() <= 1e-5, (name, splits)


def test_fp8_mma_decode_with_bf16_queries_is_as_close_to_the_reference_as_the_converting_path():
    # DecodeConfig.fp8_mma runs only for 16-bit queries (the float32 tests above take the converting path). The
    # query and the probabilities each go in as two e4m3 terms; with one term each (the obvious kernel) the
    # error here is 0.09-0.13, ten times the converting path's, which this bound catches.
    from pagedbatch.engine.attention.triton_decode import v2_constexprs
    from pagedbatch.engine.attention.triton_kernels import fp8_mma_runs

    cfg = DECODE_CONFIGS["v2-f8mma-lt"]
    runs = fp8_mma_runs(torch.device(DEV))
    assert v2_constexprs(cfg, 2, 32, 16, 1, torch.bfloat16, True, False, fp8_mma_runs=runs)["F8MMA"]
    for heads, kv_heads in ((2, 1), (6, 2), (8, 1), (16, 1)):  # groups 2, 3, 8 packed; 16 not
        b = make_batch([0, 17, 40, 100], [1] * 4, heads, kv_heads, 32, 16, torch.float32, kv_scale=SCALES)
        scale = 32**-0.5
        ref, _, _ = reference(b, scale)
        q = _torch_written(b).to(torch.bfloat16)
        errs = {}
        packed = DECODE_CONFIGS["v2-f8mma-pack-vtail-waves"]
        for name in ("v2-stages3-lt", "v2-f8mma-lt", "v2-f8mma-pack-vtail-waves"):
            for splits in (1, 3):
                out = torch.full_like(q, float("nan"))
                paged_decode(q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, scale, splits,
                             out=out, config=name, kv_scale=b.kv_scale)
                errs[name, splits] = (out.float() - ref).abs().max().item()
        converting = max(errs["v2-stages3-lt", 1], errs["v2-stages3-lt", 3])
        for splits in (1, 3):
            for name in ("v2-f8mma-lt", "v2-f8mma-pack-vtail-waves"):
                assert errs[name, splits] <= max(2 * converting, 1e-2), (heads, errs)
    assert v2_constexprs(packed, 2, 32, 16, 1, torch.bfloat16, True, False, fp8_mma_runs=runs)["PACK"]
    assert not v2_constexprs(packed, 16, 32, 16, 1, torch.bfloat16, True, False, fp8_mma_runs=runs)["PACK"]


def test_fp8_prefill_reads_torch_written_cache_with_scales():
    b = make_batch([30, 0, 45], [18, 9, 1], 6, 2, 32, 16, torch.float32, kv_scale=SCALES)
    scale = 32**-0.5
    ref, _, _ = reference(b, scale)
    q_rot = _torch_written(b)
    backend = TritonAttentionBackend(prefill_block_m=32, prefill_block_n=16)
    out = backend.attend(q_rot, b.k_cache, b.v_cache, b.meta, scale, b.kv_scale,
                         out=torch.full_like(q_rot, float("nan")))
    assert (out - ref).abs().max().item() <= 1e-5


def test_fp8_cache_write_stores_torch_cast_of_exact_quotients_and_saturates():
    # The interpreter's own fp32 -> fp8 cast is wrong (ties away from even; a round-up past a power of two
    # loses the carry: 30.5 -> 16), so on the CPU every quotient is exactly representable: fp8 values times
    # power-of-two scales, and a rotary table of quarter turns (cos 0, sin 1: k -> (-k2, k1)) that keeps
    # them exact. Out-of-range values must saturate to +-448, never NaN. The GPU test checks random values.
    scales = (2.0**-5, 0.25)
    b = make_batch([5, 20], [3, 1], 4, 2, 32, 16, torch.float32, kv_scale=scales)
    g = torch.Generator().manual_seed(3)
    b.k = torch.randn(b.k.shape, generator=g).mul(8).to(torch.float8_e4m3fn).float() * scales[0]
    b.v = torch.randn(b.v.shape, generator=g).mul(8).to(torch.float8_e4m3fn).float() * scales[1]
    b.k[0, 0, :3] = torch.tensor([1e6, -1e6, 500.0])
    b.v[3, 1, :2] = torch.tensor([float("inf"), -1e9])
    half = b.cos_sin.shape[1] // 2
    b.cos_sin = torch.cat((torch.zeros_like(b.cos_sin[:, :half]), torch.ones_like(b.cos_sin[:, half:])), 1)
    _, kc_ref, vc_ref = reference(b, 1.0)
    rotary_cache_write(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, b.meta.positions, b.meta.slot_mapping,
                       kv_scale=b.kv_scale)
    for cache, cache_ref in ((b.k_cache, kc_ref), (b.v_cache, vc_ref)):
        flat = cache.view(-1, *cache.shape[2:])
        written = ~torch.isnan(flat.float()).any(-1).any(-1)
        assert torch.equal(written, b.expected_slots), "the fp8 write touched other slots or produced NaN"
        want = cache_ref.view(-1, *cache.shape[2:])[b.expected_slots]
        assert torch.equal(flat[b.expected_slots].view(torch.uint8), want.view(torch.uint8))
    assert b.v_cache.view(-1, 2, 32).float()[b.meta.slot_mapping[3], 1, :2].tolist() == [448.0, -448.0]
    k_sat = b.k_cache.view(-1, 2, 32).float()[b.meta.slot_mapping[0], 0]
    assert k_sat[16:19].tolist() == [448.0, -448.0, 448.0]  # k1 rotated into the second half


def _key_contiguous(cache):
    """The same values in a cache stored [blocks, kv_heads, head_dim, block_size], as the logical view."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _same(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_kernels_give_the_same_bits_on_a_key_contiguous_v_cache(fp8):
    # The layout bench/fp8_v_layout_study.py argues for: decode (every distinct config, with and without
    # splits), prefill and the cache write read and write V through its strides alone.
    b = make_batch([0, 17, 40, 100], [1] * 4, 6, 2, 32, 16, torch.float32, kv_scale=SCALES if fp8 else None)
    scale = 32**-0.5
    q_rot = _torch_written(b)
    v_kc = _key_contiguous(b.v_cache)
    assert v_key_run(v_kc, 64) == 16 and v_key_run(b.v_cache, 64) == 0  # the hinted path is the one tested
    # Each config once, with and without splits in turn: V is read the same way on both paths (the split
    # path's own arithmetic is pinned by the tests above), and the interpreter's time halves.
    for i, name in enumerate(_interpreter_distinct(DECODE_CONFIGS)):
        splits = (1, 3)[i % 2]
        outs = []
        for v_cache in (b.v_cache, v_kc):
            out = torch.full_like(q_rot, float("nan"))
            paged_decode(q_rot, b.k_cache, v_cache, b.meta.block_tables, b.meta.seq_lens, scale, splits,
                         out=out, config=name, kv_scale=b.kv_scale)
            outs.append(out)
        assert torch.isfinite(outs[0]).all()
        _same(*outs)

    p = make_batch([30, 0, 45], [18, 9, 1], 6, 2, 32, 16, torch.float32, kv_scale=SCALES if fp8 else None)
    q_rot = _torch_written(p)
    backend = TritonAttentionBackend(prefill_block_m=32, prefill_block_n=16)
    outs = [backend.attend(q_rot, p.k_cache, v_cache, p.meta, scale, p.kv_scale, out=torch.full_like(q_rot, 0.0))
            for v_cache in (p.v_cache, _key_contiguous(p.v_cache))]
    _same(*outs)

    w = make_batch([5, 20], [3, 1], 4, 2, 32, 16, torch.float32, kv_scale=SCALES if fp8 else None)
    v_std, v_kc = w.v_cache.clone(), _key_contiguous(w.v_cache)
    for v_cache in (v_std, v_kc):
        rotary_cache_write(w.q, w.k, w.v, w.k_cache.clone(), v_cache, w.cos_sin, w.meta.positions,
                           w.meta.slot_mapping, kv_scale=w.kv_scale)
    _same(v_kc.contiguous(), v_std)
    assert not torch.equal(v_std.float().nan_to_num(), w.v_cache.float().nan_to_num())  # something was written


@pytest.mark.parametrize("args", [
    ("--kernel", "decode", "--group", "2"),
    ("--kernel", "decode", "--group", "7", "--splits", "4"),
    ("--kernel", "decode", "--group", "2", "--config", "v2-stages3-vtail"),
    ("--kernel", "decode", "--group", "2", "--config", DEFAULT_DECODE_CONFIG[1]),
    ("--kernel", "prefill", "--group", "7"),
], ids=["decode-g2", "decode-g7-split", "decode-g2-whole-tail", "decode-g2-fp8-default", "prefill-g7"])
def test_key_contiguous_fp8_v_is_never_read_a_byte_at_a_time_on_sm90(args, tmp_path):
    """Why the engine stores an fp8 cache's V key-contiguous: the sm_90 code the GPU runs (compiled here by
    bench/kernel_sass.py) reads no fp8 tile byte by byte from shared memory, and none from global memory in
    its loops. (The usual layout under Triton's cast: 128 LDS.U8 in the decode kernel.) Only the decode
    kernel's masked last tile without whole_v_tail loads V from global memory a byte at a time (a mask along
    the contiguous keys); whole_v_tail (the engine's fp8 default) and the prefill kernel load it whole and
    zero the keys past the end."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "kernel_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(bench), *args, "--kv", "fp8", "--v-layout", "key-contiguous",
                          "--top", "100", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (sass,) = tmp_path.glob("*.sass")
    text = sass.read_text()
    assert re.search(r"\b(HMMA|HGMMA|QGMMA)\b", text)  # the kernel itself, with its dots
    assert not re.findall(r"\bLDS\.U8\b", text)
    loops = re.findall(r"^loop \d+: .*$", out.stdout, re.M)
    # (fp8 MMAs store their e4m3 probabilities to shared memory a byte at a time, STS.U8: not a tile read)
    assert loops and not [line for line in loops if re.search(r"\b(LDS|LDG\.E)\.U8\b", line)], loops
    byte_loads = len(re.findall(r"\bLDG\.E\.U8\b", text))
    masked_tail = args[1] == "decode" and "--config" not in args  # bench/kernel_sass.py's v2-stages3
    assert byte_loads == (64 if masked_tail else 0)  # 64 keys x 128 bytes over 128 threads


def test_triton_basic_backend_refuses_a_v_cache_laid_out_unlike_k():
    from pagedbatch.engine.attention import triton_paged

    b = make_batch([17], [1], 2, 1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="K and V caches of one layout"):
        triton_paged.paged_decode(b.q, b.k_cache, _key_contiguous(b.v_cache), b.meta, 1.0)


def test_kernels_refuse_a_k_cache_whose_head_dim_is_strided():
    b = make_batch([17], [1], 2, 1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous head_dim"):
        paged_decode(b.q, _key_contiguous(b.k_cache), b.v_cache, b.meta.block_tables, b.meta.seq_lens, 1.0, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_cache_without_scales_is_an_error(backend):
    b = make_batch([5], [1], 2, 1, 32, 16, torch.float32, kv_scale=SCALES)
    impl = TorchAttentionBackend() if backend == "torch" else TritonAttentionBackend()
    with pytest.raises(ValueError, match="fp8 KV cache needs its layer's scales"):
        impl.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, b.meta, 1.0)


# ---------------------------------------------------------------- GPU, bf16 queries, real sizes

GPU_TOL = 2e-2  # max abs error of bf16 kernels against the float32 reference on the same inputs (outputs O(1))


@functools.lru_cache(maxsize=None)
def _decode_case(group: int, kv_heads: int, n: int, fp8: bool):
    """A decode batch (built once per session: the CPU side is slow at these sizes) and its reference."""
    g = torch.Generator().manual_seed(group * n)
    ctx = [0, 4095] + torch.randint(1, 4096, (n - 2,), generator=g).tolist()
    b = make_batch(ctx, [1] * n, group * kv_heads, kv_heads, 128, 16, torch.bfloat16, seed=n,
                   kv_scale=SCALES if fp8 else None)
    ref, _, _ = reference(b, 128**-0.5)
    return b, ref


def _poisoned_attend(backend, b, scale, meta=None):
    """Rotary + write, then attention into a NaN-filled output (and a NaN-filled split workspace)."""
    meta = meta or b.meta
    q_rot = rotary_cache_write(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, meta.positions, meta.slot_mapping,
                               kv_scale=b.kv_scale)
    T, H, D = q_rot.shape
    kvh = b.k_cache.shape[2]
    splits = backend.decode_num_splits(meta.num_seqs, kvh, meta.max_seq_len, q_rot.device, H // kvh,
                                       b.k_cache.dtype)
    if meta.is_decode_only and splits > 1:  # every split must write its partial output and log-sum-exp
        for part in backend._workspace.get(meta.num_seqs, H, splits, D, q_rot.device):
            part.fill_(float("nan"))
    out = torch.full_like(q_rot, float("nan"))
    got = backend.attend(q_rot, b.k_cache, b.v_cache, meta, scale, b.kv_scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "an output element was not written, or a poisoned slot was read"
    return out.float()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
def test_gpu_every_decode_config_at_real_shapes(name, fp8):
    """W-nano's group of 2 and Qwen2.5-7B's group of 7, head_dim 128, block 16, contexts 1 to 4,096 with
    each config's own split choice at two batch sizes (and so two split counts)."""
    for group, kvh in ((2, 8), (7, 4)):
        for n in (3, 24):
            b, ref = _decode_case(group, kvh, n, fp8)
            b = dataclasses.replace(b, k_cache=b.k_cache.clone(), v_cache=b.v_cache.clone())
            got = _poisoned_attend(TritonAttentionBackend(decode_config=name), b, 128**-0.5)
            assert (got - ref).abs().max().item() <= GPU_TOL, (name, group, n)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", ["v1", "v2-stages3", "v2-stages3-cast", "v2-lanes", "v2-lt-waves", "v2-f8mma-lt-waves",
                                  "v2-f8mma-lt-vtail-waves", "v2-f8mma-pack-vtail-waves"])
def test_gpu_decode_on_a_key_contiguous_v_cache_at_real_shapes(name, fp8):
    """The same cases with V stored [blocks, kv_heads, head_dim, block_size] (bench/fp8_v_layout_study.py):
    the hinted vector loads of the V tile and the cache write through V's strides."""
    for group, kvh in ((2, 8), (7, 4)):
        for n in (3, 24):
            b, ref = _decode_case(group, kvh, n, fp8)
            b = dataclasses.replace(b, k_cache=b.k_cache.clone(), v_cache=_key_contiguous(b.v_cache))
            assert v_key_run(b.v_cache, 64) == 16
            got = _poisoned_attend(TritonAttentionBackend(decode_config=name), b, 128**-0.5)
            assert (got - ref).abs().max().item() <= GPU_TOL, (name, group, n)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 7, 8])
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_fp8_kernels_contexts_1_to_8192_with_bit_exact_writes(group, block_size):
    """fp8 cache, bf16 queries: the fused write stores exactly torch's cast (IEEE division, saturation, round
    to nearest even, unfused rotary); decode (default config, forced splits) and prefill/mixed batches read it
    within 2e-2 of the float32 reference on the same fp8 bytes; every output element is written."""
    scale = 128**-0.5
    g = torch.Generator().manual_seed(group * block_size)
    decode_ctx = [0, 1, 8191, 4096, 255, 16] + torch.randint(2, 8192, (10,), generator=g).tolist()
    cases = [(decode_ctx, [1] * len(decode_ctx), None), (decode_ctx[:4], [1] * 4, 8),
             ([0, 1000, 7000] + decode_ctx[:6], [700, 96, 33] + [1] * 6, None)]
    for ctx, q_lens, splits in cases:
        b = make_batch(ctx, q_lens, 4 * group, 4, 128, block_size, torch.bfloat16, seed=len(ctx),
                       kv_scale=SCALES)
        ref, kc_ref, vc_ref = reference(b, scale)
        got = _poisoned_attend(TritonAttentionBackend(num_splits=splits), b, scale)
        for cache, cache_ref in ((b.k_cache, kc_ref), (b.v_cache, vc_ref)):
            slots = b.expected_slots
            mine = cache.view(torch.uint8).view(-1, *cache.shape[2:])[slots]
            theirs = cache_ref.view(torch.uint8).view(-1, *cache.shape[2:])[slots]
            assert torch.equal(mine, theirs), "fp8 bytes differ from torch's cast"
            untouched = ~slots
            assert torch.isnan(cache.view(-1, *cache.shape[2:])[untouched].float()).all()
        assert (got - ref).abs().max().item() <= GPU_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("v_tile", [0, 16, 64])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_prefill_v_by_token_tiles_into_a_key_contiguous_cache_stores_torchs_cast(v_tile, block_size):
    """Prefill's V written by tiles of consecutive tokens (``v_tile``, triton_backend.PREFILL_V_TILE) into a
    key-contiguous fp8 V cache stores exactly torch's cast, K too, at the written slots only, and the
    attention over it reads them (mixed prefill and decode rows, sequences resuming mid-block)."""
    scale = 128**-0.5
    for group in (2, 7):
        b = make_batch([0, 1000, 37, 5, 700], [700, 96, 33, 1, 130], 4 * group, 4, 128, block_size,
                       torch.bfloat16, seed=group + v_tile, kv_scale=SCALES)
        ref, kc_ref, vc_ref = reference(b, scale)  # on a copy in the logical layout
        b = dataclasses.replace(b, v_cache=_key_contiguous(b.v_cache))
        q_rot = rotary_cache_write(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, b.meta.positions,
                                   b.meta.slot_mapping, kv_scale=b.kv_scale, v_tile=v_tile)
        for cache, cache_ref in ((b.k_cache, kc_ref), (b.v_cache, vc_ref)):
            flat = cache.reshape(-1, *cache.shape[2:])  # the logical order (a copy for the permuted V)
            flat_ref = cache_ref.reshape(-1, *cache_ref.shape[2:])
            slots = b.expected_slots
            assert torch.equal(flat.view(torch.uint8)[slots], flat_ref.view(torch.uint8)[slots]), \
                f"fp8 bytes differ from torch's cast (group {group})"
            assert torch.isnan(flat[~slots].float()).all(), "the write touched other slots"
        out = TritonAttentionBackend().attend(q_rot, b.k_cache, b.v_cache, b.meta, scale, b.kv_scale,
                                              out=torch.full_like(q_rot, float("nan")))
        assert (out - ref).abs().max().item() <= GPU_TOL


@pytest.mark.gpu
def test_gpu_fp8_decode_graph_reads_scales_from_the_device_tensor():
    """A captured decode graph reads kv_scale from its device tensor: changing it after capture changes the
    result as the reference says (nothing host-side was baked in)."""
    b = make_batch([100, 2000, 3000, 50], [1] * 4, 28, 4, 128, 16, torch.bfloat16, kv_scale=SCALES)
    scale = 128**-0.5
    backend = TritonAttentionBackend(num_splits=4)
    q_rot = rotary_cache_write(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cos_sin, b.meta.positions,
                               b.meta.slot_mapping, kv_scale=b.kv_scale)
    backend.attend(q_rot, b.k_cache, b.v_cache, b.meta, scale, b.kv_scale)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(q_rot, b.k_cache, b.v_cache, b.meta, scale, b.kv_scale)
    b.kv_scale.copy_(torch.tensor([0.05, 0.5], device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    kc, vc = clean(b.k_cache), clean(b.v_cache)
    bt = b.meta.block_tables
    meta = dataclasses.replace(b.meta, block_tables=torch.where(bt >= kc.shape[0], 0, bt))
    ref = paged_attention_reference(q_rot.float(), kc, vc, meta, scale, b.kv_scale)
    assert (out.float() - ref).abs().max().item() <= GPU_TOL


@triton.jit
def _convert_tile(X, Y, ASM: tl.constexpr):
    r = tl.arange(0, 64)[:, None] * 128 + tl.arange(0, 128)[None, :]
    tl.store(Y + r, _fp8_to_f16(tl.load(X + r), ASM))


@pytest.mark.gpu
@pytest.mark.parametrize("asm", [True, False], ids=["paired-cvt", "triton-cast"])
def test_gpu_fp8_tile_conversion_is_torchs_for_every_byte_in_order(asm):
    """The kernels' e4m3 -> fp16 conversion (``_fp8_to_f16``): every non-NaN byte value converts to torch's
    value, at its own position (the paired PTX conversion packs 4 bytes per register: a swapped pair or
    half would move values), in a 2-D tile as the attention kernels load it."""
    assert fp8_tile_convert(torch.device(DEV)) and not fp8_tile_convert(torch.device("cpu"))
    codes = torch.arange(256, dtype=torch.uint8, device=DEV)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaNs
    g = torch.Generator(device=DEV).manual_seed(0)
    x = codes[torch.randint(0, codes.numel(), (64 * 128,), device=DEV, generator=g)]
    x[:codes.numel()] = codes
    x = x.view(torch.float8_e4m3fn)
    y = torch.full((64 * 128,), float("nan"), dtype=torch.float16, device=DEV)
    _convert_tile[(1,)](x, y, ASM=asm)
    assert torch.equal(y, x.to(torch.float16))
