"""The fp8 x fp8 GEMM for mid-sized batches (models/mid_gemm.py) and the routing that sends tuned shapes to it.

On the CPU the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU) at small shapes that cover its paths:
partial row and column tiles, K tails, bias, output dtypes, the grouped
program order with more row tiles than a group. Outputs start as NaN, so an
element never written shows up. The reference is float64 of the same e4m3
operands and scales. On the GPU (``-m gpu``) every tuned entry at its real
shape, eager and in a CUDA graph, held to torch._scaled_mm's accuracy on the
same operands, and a PDL-launched chain with the quantization kernel.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedbatch.engine.models import linear as linear_mod  # noqa: E402
from pagedbatch.engine.models import mid_gemm as mg  # noqa: E402
from pagedbatch.engine.models.fp8 import quantize_rows  # noqa: E402
from pdl_chain import assert_chain_under_pdl_gives_the_bits_without_pdl  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
C = mg.MidConfig.parse


def operands(M, N, K, g, bias=False):
    xq, xs = quantize_rows(torch.randn(M, K, generator=g) * 3)
    wq, ws = quantize_rows(torch.randn(N, K, generator=g) * 0.05)
    b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
    ref = (xq.double() * xs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).T
    if b is not None:
        ref += b.double()
    to = (lambda t: t.to(DEV) if t is not None else None)
    return to(xq), to(xs), to(wq), to(ws), to(b), ref


def run(xq, xs, wq, ws, b, cfg, dtype=torch.bfloat16):
    out = torch.full((xq.shape[0], wq.shape[0]), float("nan"), dtype=dtype, device=xq.device)
    y = mg.mid_linear(xq, xs, wq, ws, b, out_dtype=dtype, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


def assert_close(y, ref, dtype):
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "an output element was never written"
    # One rounding to the output dtype on top of float32 sums: a whole unit in the last place, since
    # Triton's interpreter truncates float32 -> bf16/fp16 where the GPU rounds to nearest (seen: 2.7805 -> 2.7656).
    rel = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}[dtype]
    tol = rel * ref.abs() + 1e-4 * ref.abs().max()
    assert ((y - ref).abs() <= tol).all(), f"max error {(y - ref).abs().max().item():.3g}"


# (config, M, N, K): partial row tiles (M 5 and 70 of 32/64-row tiles), partial column tiles (N 48 of 32,
# 200 of 64), K tails (96 of 64-wide K tiles, 160 of 128), several row tiles in one group (M 70, group 2),
# a prefill-sized step on the 128-row tiles of buckets above 512 (M 600: five row tiles, the last partial).
CASES = [
    ("bm32 bn32 bk64 g8 w4 st2", 5, 48, 96),
    ("bm32 bn64 bk128 g2 w4 st2", 70, 200, 160),
    ("bm64 bn32 bk64 g8 w4 st3", 64, 64, 128),
    ("bm128 bn128 bk64 g8 w8 st3", 600, 136, 192),
]


@pytest.mark.parametrize("cfg,M,N,K", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kernel_matches_float64_of_the_same_fp8_operands(cfg, M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    xq, xs, wq, ws, b, ref = operands(M, N, K, g, bias)
    assert_close(run(xq, xs, wq, ws, b, C(cfg)), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_kernel_writes_any_output_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    xq, xs, wq, ws, b, ref = operands(9, 40, 64, g)
    assert_close(run(xq, xs, wq, ws, None, C("bm32 bn32 bk32 g8 w4 st2"), dtype), ref, dtype)


def test_kernel_takes_scales_as_a_column_and_zero_rows():
    g = torch.Generator().manual_seed(3)
    xq, xs, wq, ws, b, ref = operands(4, 32, 64, g)
    cfg = C("bm32 bn32 bk32 g8 w4 st2")
    assert_close(run(xq, xs[:, None].contiguous(), wq, ws, None, cfg), ref, torch.bfloat16)
    empty = mg.mid_linear(xq[:0], xs[:0], wq, ws, config=cfg)
    assert empty.shape == (0, 32)


def test_bad_operands_are_refused_with_what_is_wrong():
    g = torch.Generator().manual_seed(5)
    xq, xs, wq, ws, b, ref = operands(4, 32, 64, g)
    cfg = C("bm32 bn32 bk32 g8 w4 st2")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        mg.mid_linear(xq.float(), xs, wq, ws, config=cfg)
    with pytest.raises(ValueError, match="contiguous"):
        mg.mid_linear(xq, xs, wq[:, :32], ws, config=cfg)
    with pytest.raises(ValueError, match="per-token scales"):
        mg.mid_linear(xq, xs[:2], wq, ws, config=cfg)
    with pytest.raises(ValueError, match="no config"):
        mg.mid_linear(xq, xs, wq, ws)



def test_config_text_round_trips_and_bad_tiles_are_refused():
    for text in ("bm64 bn64 bk128 g8 w4 st4", "bm32 bn256 bk256 g1 w8 st3"):
        assert str(C(text)) == text
    with pytest.raises(ValueError, match="power of two"):
        mg.MidConfig(block_m=48)
    with pytest.raises(ValueError, match="MMA tiles"):
        mg.MidConfig(block_k=16)
    with pytest.raises(ValueError, match="not a mid_gemm config"):
        C("a8 bm64 bn64 bk128 g8 w4 st4")


@pytest.fixture
def tuned(monkeypatch):
    """TUNED as a sweep would paste it: bucket 32 of a [48, 96] weight; the kernel "supported" on the CPU
    (the interpreter) so the routing can be followed there."""
    monkeypatch.setattr(mg, "TUNED", {(32, 48, 96): "bm32 bn32 bk64 g8 w4 st2"})
    monkeypatch.setattr(mg, "mid_supported", lambda N, K, device: True)
    mg._default.cache_clear()
    yield
    mg._default.cache_clear()


def test_default_config_is_tuneds_in_its_bucket_only(tuned):
    assert str(mg.default_config(17, 48, 96)) == "bm32 bn32 bk64 g8 w4 st2"
    assert str(mg.default_config(32, 48, 96)) == "bm32 bn32 bk64 g8 w4 st2"
    assert mg.default_config(33, 48, 96) is None  # bucket 64: not measured
    assert mg.default_config(32, 64, 96) is None  # another shape
    assert mg.default_config(600, 48, 96) is None  # bucket 1024 (steps with prefill): not measured
    assert mg.default_config(20_000, 48, 96) is None  # above the largest bucket


def test_steps_with_prefill_take_the_kernel_only_in_a_tuned_bucket(monkeypatch):
    """Buckets above 512 rows are for steps with prefill: a sweep's entry for 8,192 serves 4,097-8,192 rows."""
    monkeypatch.setattr(mg, "TUNED", {(8192, 48, 96): "bm128 bn128 bk64 g8 w8 st3"})
    monkeypatch.setattr(mg, "mid_supported", lambda N, K, device: True)
    monkeypatch.setattr(linear_mod, "_skinny", lambda: None)
    mg._default.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert [mg.m_bucket(m) for m in (513, 1024, 4097, 8192, 16384, 16385)] == [1024, 1024, 8192, 8192, 16384, None]
        assert [linear_mod.route(m, 48, 96, FP8, cuda, True) for m in (4096, 4097, 8192, 8193)] == \
            ["scaled_mm", "mid", "mid", "scaled_mm"]
    finally:
        mg._default.cache_clear()


def test_quantized_rows_take_the_tuned_kernel_else_scaled_mm(tuned, monkeypatch):
    """linear's fp8 matmul of per-token-quantized rows: our kernel where TUNED has the shape and bucket, with
    _scaled_mm's numerics; torch._scaled_mm everywhere else."""
    g = torch.Generator().manual_seed(11)
    calls = []
    monkeypatch.setattr(linear_mod, "_scaled_mm", lambda *a: calls.append("scaled_mm"))
    xq, xs, wq, ws, b, ref = operands(20, 48, 96, g, bias=True)
    y = linear_mod._fp8_matmul(xq, xs[:, None], wq, ws, b, torch.float32)
    assert calls == [] and y.dtype == torch.float32
    assert_close(y, ref, torch.float32)
    xq, xs, wq, ws, b, ref = operands(40, 48, 96, g)
    linear_mod._fp8_matmul(xq, xs[:, None], wq, ws, None, torch.bfloat16)
    assert calls == ["scaled_mm"]


def test_route_names_mid_only_on_a_gpu_with_a_tuned_shape(tuned, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(linear_mod, "_skinny", lambda: None)
    assert linear_mod.route(24, 48, 96, FP8, cuda, True) == "mid"
    assert linear_mod.route(40, 48, 96, FP8, cuda, True) == "scaled_mm"
    assert linear_mod.route(24, 48, 96, torch.bfloat16, cuda, False) == "linear"
    assert linear_mod.route(24, 48, 96, FP8, torch.device("cpu"), True) == "reference"


def test_untuned_shapes_take_the_32_row_default_within_the_swept_sizes_only():
    shape = (2048, 2048)  # in no model of TUNED
    assert all((mb,) + shape not in mg.TUNED for mb in mg.M_BUCKETS)
    assert str(mg.default_config(17, *shape)) == mg.DEFAULT_32
    assert str(mg.default_config(32, *shape)) == mg.DEFAULT_32
    assert mg.default_config(33, *shape) is None  # above 32 rows only measured shapes
    assert mg.default_config(32, 128, 2048) is None  # narrower than any swept matmul
    assert mg.default_config(32, 2048, 65536) is None  # longer K than any swept matmul


def test_every_tuned_entry_parses_and_lies_in_its_bucket():
    for (mb, N, K), text in mg.TUNED.items():
        cfg = C(text)
        assert mb in mg.M_BUCKETS and K % 16 == 0 and N > 0, (mb, N, K)
        assert cfg.block_m <= max(32, mb), (mb, text)  # no tile mostly of padding rows


# A small model's real shapes (Qwen3-0.6B: qkv, o, gate_up, down), and every tuned entry at its own shape.
SHAPES_06B = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
# DEFAULT_32 at untuned shapes at the edges of its span (K tails of its 128-wide tiles included).
DEFAULT_CASES = [(32, 2048, 2048), (32, 896, 18944), (32, 37888, 896), (32, 1000, 1040)]
GPU_CASES = sorted({(mb, n, k, text) for (mb, n, k), text in mg.TUNED.items()}
                   | {(mb, n, k, "bm64 bn64 bk128 g8 w4 st4") for mb in (32, 256) for n, k in SHAPES_06B}
                   | {(mb, n, k, mg.DEFAULT_32) for mb, n, k in DEFAULT_CASES}
                   | {(8192, n, k, "bm128 bn128 bk128 g8 w8 st3") for n, k in SHAPES_06B})  # prefill-sized


def _scaled_mm_any_n(xq, xs, wq, ws, b):
    """torch._scaled_mm on these operands; where N is no multiple of 16 (cuBLASLt refuses it, our kernel does
    not) on zero weight rows padded to one, sliced back: each output column only reads its own weight row."""
    N = wq.shape[0]
    pad = -N % 16
    if pad:
        wq = torch.cat([wq, wq.new_zeros(pad, wq.shape[1])])
        ws = torch.cat([ws, ws.new_ones(pad)])
        b = None if b is None else torch.cat([b, b.new_zeros(pad)])
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None].contiguous(), scale_b=ws.view(1, -1), bias=b,
                           out_dtype=torch.bfloat16)
    return out[:, :N]


@pytest.mark.gpu
@pytest.mark.parametrize("mb,N,K,cfg", GPU_CASES)
def test_gpu_kernel_at_real_shapes_and_in_a_cuda_graph(mb, N, K, cfg):
    """Each bucket's smallest and largest row count (partial and whole row tiles), eager and replayed, held to
    torch._scaled_mm's accuracy on the same operands (Hopper's fp8 MMA sums with fewer bits than float32:
    both land ~1 bf16 unit off in places, 2-4e-3 of max |y| on the H200)."""
    g = torch.Generator().manual_seed(N + K + mb)
    lo = max(b for b in (0,) + mg.M_BUCKETS if b < mb) + 1
    cfg = C(cfg)
    for M in (lo, mb):
        xq, xs, wq, ws, b, ref = operands(M, N, K, g, bias=N in (4096, 4608))  # the qkv shapes have a bias
        theirs = _scaled_mm_any_n(xq, xs, wq, ws, b)
        bound = 1.25 * (theirs.double().cpu() - ref).abs().max().item() + 1e-4 * ref.abs().max().item()

        def check(y):
            y = y.double().cpu()
            assert torch.isfinite(y).all(), "an output element was never written"
            err = (y - ref).abs().max().item()
            assert err <= bound, f"max error {err:.3g}, torch._scaled_mm's x 1.25: {bound:.3g}"
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
        check(mg.mid_linear(xq, xs, wq, ws, b, config=cfg, out=out))
        out.fill_(float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mg.mid_linear(xq, xs, wq, ws, b, config=cfg, out=out)
        graph.replay()
        torch.cuda.synchronize()
        check(out)


@pytest.mark.gpu
def test_gpu_quantize_then_mid_gemm_chain_under_pdl_gives_the_bits_without_pdl(monkeypatch):
    """The per-token quantization kernel and the GEMM, launched with programmatic dependent launch (each may
    start while its producer runs), eager and in a CUDA graph: the bits of the chain without PDL."""
    from pagedbatch.engine import pdl
    from pagedbatch.engine.models.fp8 import quantize_per_token

    if torch.cuda.get_device_capability() < (9, 0) or pdl.gdc_wait is None:
        pytest.skip("PDL needs compute capability 9.0+ and Triton with grid dependency control")
    g = torch.Generator(device="cuda").manual_seed(0)
    D, M = 1024, 48
    ws = [quantize_rows(torch.randn(D, D, device="cuda", generator=g) * 0.03) for _ in range(6)]
    cfgs = [C("bm64 bn32 bk128 g8 w4 st4"), C("bm32 bn64 bk256 g8 w4 st3")]

    def chain(x):
        for i, (w, s) in enumerate(ws):
            x = mg.mid_linear(*quantize_per_token(x), w, s, config=cfgs[i % 2])
        return x

    inputs = [torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    assert_chain_under_pdl_gives_the_bits_without_pdl(chain, inputs, monkeypatch)
