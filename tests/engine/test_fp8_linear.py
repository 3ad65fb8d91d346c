"""fp8 numerics and the linear dispatch: the quantization rule, the fused activation kernel (Triton interpreter on
the CPU), the float32 reference path, which kernel each shape and device takes, and the clear error on GPUs
without fp8."""
import pytest
import torch

from pagedbatch.engine.models import fp8, linear as linear_mod
from pagedbatch.engine.models.fp8 import FP8, check_fp8_support, dequantize_rows, quantize_rows
from pagedbatch.engine.models.linear import fp8_linear_reference, linear, route

# The kernel test runs where the kernel runs: on the GPU when there is one, else in Triton's interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The distance between e4m3 values around |v| (v in scaled units: |v| <= 448)."""
    e = torch.floor(torch.log2(v.abs().clamp(min=2**-6)))
    return torch.pow(2.0, e - 3)


def test_rows_scale_by_their_amax_over_448_and_round_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 1.0])[:, None]
    x[4, 7] = 1e4  # an outlier sets its row's scale
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (5,)
    amax = x.abs().amax(1)
    assert torch.equal(s[[0, 1, 2, 4]], amax[[0, 1, 2, 4]] / 448.0)
    assert s[3] == 1.0 and not q[3].float().any(), "an all-zero row: scale 1, zero values"
    assert (q.float().abs().amax(1)[[0, 1, 2, 4]] == 448).all(), "each row's largest value maps to 448"
    scaled = x / s[:, None]
    assert ((q.float() - scaled).abs() <= e4m3_step(scaled) / 2).all()
    back = dequantize_rows(q, s)
    assert back.dtype == torch.float32 and torch.equal(back, q.float() * s[:, None])


def _poisoned_rows(M, K, stride, values):
    """``values`` [M, K] inside a NaN-filled [M, stride] buffer: any read past a row's end returns NaN."""
    buf = torch.full((M, stride), float("nan"), device=DEV)
    buf[:, :K] = values
    return buf[:, :K]


@pytest.mark.parametrize("K", [40, 8200])  # the whole row in one block; two blocks, the second one partial
def test_fused_activation_kernel_matches_the_torch_rule(K):
    # Rows of e4m3 values times a power of two (each with a 448): the scale is that power of two and
    # every scaled value is exactly representable. The interpreter's float32 -> e4m3 cast is wrong when
    # rounding carries into the next power of two (GPU_FACTS.md), so on the CPU values are checked
    # only where no rounding happens; the GPU test checks arbitrary values bit for bit.
    torch.manual_seed(1)
    M = 4
    codes = torch.randint(0, 256, (M, K), dtype=torch.uint8)
    codes[(codes & 0x7F) >= 0x7E] = 0  # neither NaN nor 448 (placed below)
    values = codes.view(FP8).float()
    values[:, K - 3] = 448.0  # in the last (partial) block
    values[2] = 0.0  # an all-zero row
    values *= torch.tensor([2.0**-12, 1.0, 1.0, 2.0**5])[:, None]
    x = _poisoned_rows(M, K, K + 24, values)
    out = torch.full((M, K), float("nan"), device=DEV).to(FP8)
    scale_out = torch.full((M, 1), float("nan"), device=DEV)
    q, s = fp8.quantize_per_token_triton(x, out, scale_out)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == scale_out.data_ptr()
    ref_q, ref_s = quantize_rows(x)
    assert torch.equal(s[:, 0], ref_s) and s[2, 0].item() == 1.0
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    # Arbitrary values: the same scales (the same float32 division), every element written.
    x = _poisoned_rows(M, K, K + 24, torch.randn(M, K) * torch.logspace(-2, 2, M)[:, None])
    q, s = fp8.quantize_per_token_triton(x, out, scale_out)
    assert torch.equal(s[:, 0], quantize_rows(x)[1])
    assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("rows", [6, 40])
def test_reference_linear_is_the_dequantized_float32_product(rows):
    # Like the GPU: up to skinny_max_m rows the activations stay unquantized (the skinny kernel's
    # weights-only fp8), above it they are quantized per token (the _scaled_mm route).
    from pagedbatch.engine.models.linear import weights_only_rows

    torch.manual_seed(2)
    x = torch.randn(2, rows // 2, 64)  # leading dims are kept
    w = torch.randn(48, 64) * 0.05
    bias = torch.randn(48)
    wq, ws = quantize_rows(w)
    got = linear(x, wq, bias, ws)
    a = x.reshape(rows, 64)
    if rows > weights_only_rows():
        a = dequantize_rows(*quantize_rows(a))
    want = a @ dequantize_rows(wq, ws).t() + bias
    assert got.shape == (2, rows // 2, 48) and torch.allclose(got.reshape(rows, 48), want, rtol=1e-6, atol=1e-6)
    x, rows = x[:, :3], 6
    xq, xs = quantize_rows(x.reshape(6, 64))
    want = dequantize_rows(xq, xs) @ dequantize_rows(wq, ws).t() + bias
    # fp8 error against the unquantized product: a few percent, not more (GPU_FACTS.md: 3.8e-2 at 0.02 std).
    exact = x.reshape(6, 64) @ w.t() + bias
    rel = ((want - exact).norm() / exact.norm()).item()
    assert 5e-3 < rel < 6e-2, rel
    # bf16 activations come back in bf16.
    assert fp8_linear_reference(x.reshape(6, 64).bfloat16(), wq, ws).dtype == torch.bfloat16


class _FakeSkinny:
    """Stands in for skinny_gemm.py: up to 16 rows, K a multiple of 64."""

    def skinny_max_m(self, weight_dtype=None):
        return 16

    def skinny_supported(self, M, N, K, weight_dtype, device):
        return K % 64 == 0 and weight_dtype in (FP8, torch.bfloat16)


def test_route_depends_on_shapes_dtypes_and_device_only(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert route(1, 4096, 4096, FP8, cpu, True) == "reference"
    assert route(1, 4096, 4096, torch.float32, cpu, False) == "linear"
    monkeypatch.setattr(linear_mod, "_skinny", lambda: None)  # without skinny_gemm.py
    assert route(1, 4096, 4096, FP8, cuda, True) == "scaled_mm"
    assert route(1, 4096, 4096, torch.bfloat16, cuda, False) == "linear"
    assert route(512, 129 * 2, 4096, FP8, cuda, True) == "reference", "N not a multiple of 16: _scaled_mm refuses"
    assert route(512, 4096, 129, FP8, cuda, True) == "reference", "K not a multiple of 16"
    monkeypatch.setattr(linear_mod, "_skinny", lambda: _FakeSkinny())
    assert route(16, 4096, 4096, FP8, cuda, True) == "skinny"
    assert route(17, 4096, 4096, FP8, cuda, True) == "scaled_mm"
    assert route(8, 4096, 4000, FP8, cuda, True) == "scaled_mm", "a shape the skinny kernel does not take"
    assert route(8, 4096, 4096, torch.bfloat16, cuda, False) == "skinny"
    monkeypatch.setattr(linear_mod, "USE_SKINNY_BF16", False)
    assert route(8, 4096, 4096, torch.bfloat16, cuda, False) == "linear"
    assert route(8, 4096, 4096, FP8, cuda, True) == "skinny", "the switch is for bf16 weights only"


def test_fp8_on_a_gpu_without_fp8_is_a_clear_error_naming_the_gpu(monkeypatch, tiny_model):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r">= 8\.9.*NVIDIA A100-SXM4-80GB \(compute capability 8\.0\)"):
        check_fp8_support(torch.device("cuda", 0))
    check_fp8_support(torch.device("cpu"))  # the CPU runs the reference path
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_support(torch.device("cuda", 0))
    # The loader checks before it allocates anything on the GPU.
    from pagedbatch.engine.models.config import ModelArgs
    from pagedbatch.engine.models.loader import load_model

    d = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="needs a GPU with fp8 matmuls"):
        load_model(d, ModelArgs.from_dir(d), torch.bfloat16, torch.device("cuda", 0), quantization="fp8")


def test_rows_quantized_by_the_producing_kernel_change_nothing_but_the_kernel_count(monkeypatch, tiny_model):
    """linear.FUSE_FP8_QUANT through the whole model on the CPU: with the GPU's routing stood in for (every
    fp8 linear of more than 2 rows on the _scaled_mm route, _scaled_mm as float32 torch ops), the norms and
    the SiLU·mul hand qkv, gate_up and down their input already quantized, o_proj still quantizes its own,
    and the greedy tokens are those of the unfused path."""
    from pagedbatch import InferenceEngine, SamplingParams

    real_route = linear_mod.route
    monkeypatch.setattr(linear_mod, "route", lambda M, N, K, dt, dev, fp8: "scaled_mm" if fp8 and M > 2
                        else real_route(M, N, K, dt, dev, fp8))
    calls = {"rows": 0, "own": 0}

    def fake_scaled_mm(xq, xs, weight, weight_scale, bias, dtype):
        out = dequantize_rows(xq, xs[:, 0]) @ dequantize_rows(weight, weight_scale).t()
        return (out if bias is None else out + bias.float()).to(dtype)

    def counted(key):
        def run(*a):
            calls[key] += 1
            return fake_scaled_mm(*a)
        return run

    d = tiny_model("llama")
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8, 1, 4, 6, 2], [11, 12]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    monkeypatch.setattr(linear_mod, "_scaled_mm", fake_scaled_mm)
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT", False)
    want = [o.token_ids for o in InferenceEngine(d, quantization="fp8", skip_tokenizer_init=True)
            .generate(prompts, greedy)]
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT", True)
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT_MIN_ROWS", 3)  # this test's few rows
    eng = InferenceEngine(d, quantization="fp8", skip_tokenizer_init=True)
    real_linear_rows = linear_mod.linear

    def spy_linear(x, *a, **k):
        if isinstance(x, fp8.Fp8Rows):
            calls["rows"] += 1
        return real_linear_rows(x, *a, **k)

    for mod in ("pagedbatch.engine.models.llama", "pagedbatch.engine.models.linear"):
        monkeypatch.setattr(f"{mod}.linear", spy_linear)
    monkeypatch.setattr(linear_mod, "fp8_linear_dynamic", lambda x, w, ws, b=None: counted("own")(
        *fp8.quantize_per_token(x), w, ws, b, x.dtype))
    assert [o.token_ids for o in eng.generate(prompts, greedy)] == want
    layers = eng.engine.runner.model.args.num_layers
    assert calls["rows"] > 0 and calls["rows"] == 3 * calls["own"], calls  # qkv, gate_up, down vs o_proj
    assert calls["own"] % layers == 0, calls


def test_producing_kernels_quantize_only_from_the_row_count_where_that_measured_faster(monkeypatch):
    # One program a row in the fused SiLU·mul + quantize kernel: too few rows leave the GPU idle.
    monkeypatch.setattr(linear_mod, "route", lambda M, N, K, dt, dev, fp8: "scaled_mm" if fp8 else "linear")
    w, ws = quantize_rows(torch.randn(32, 64))
    cpu = torch.device("cpu")
    m = linear_mod.FUSE_FP8_QUANT_MIN_ROWS
    assert linear_mod.FUSE_FP8_QUANT and 16 < m <= 64
    assert linear_mod.takes_fp8_rows(m, w, ws, cpu) and not linear_mod.takes_fp8_rows(m - 1, w, ws, cpu)
    assert not linear_mod.takes_fp8_rows(m, w.float(), None, cpu)  # bf16 weights take bf16 rows
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT", False)
    assert not linear_mod.takes_fp8_rows(512, w, ws, cpu)


def test_pre_quantized_rows_go_only_to_the_scaled_mm_route():
    x = torch.randn(4, 64)
    w, ws = quantize_rows(torch.randn(32, 64))
    rows = fp8.Fp8Rows(*fp8.quantize_per_token(x), torch.float32)
    assert not linear_mod.takes_fp8_rows(4, w, ws, torch.device("cpu"))
    with pytest.raises(ValueError, match="takes_fp8_rows"):
        linear(rows, w, None, ws)
