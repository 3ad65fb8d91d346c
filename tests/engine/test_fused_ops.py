"""The fused RMSNorm(+residual) and SiLU-and-mul Triton kernels equal the torch ops they replace.

Run through Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) and natively on the GPU.
"""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pagedbatch.engine.models import fused_ops  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 arithmetic is wrong in the interpreter (../shared/CPU_NOTES.md): bf16 cases run on the GPU only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")


def _ref_norm(x, w, eps, residual=None):
    if residual is not None:
        x = residual = x + residual
    return fused_ops.rms_norm_torch(x, w, eps), residual


def _ulps(a, b):
    """Largest difference in units of the last place of ``a``'s dtype (relative to |b|)."""
    eps = torch.finfo(a.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs() * eps).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("D", [64, 96])  # 96: a hidden size that is not a power of two
def test_rms_norm_kernel_matches_torch(dtype, with_residual, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(5, D, generator=g).to(dtype).to(DEV)
    r = torch.randn(5, D, generator=g).to(dtype).to(DEV) if with_residual else None
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype).to(DEV)
    got, got_res = fused_ops._rms_norm_triton(x, w, 1e-6, r)
    want, want_res = _ref_norm(x, w, 1e-6, r)
    if with_residual:
        assert torch.equal(got_res, want_res)
    else:
        assert got_res is None
    # float32: the sum of squares is reassociated; bf16: at most one rounding step apart.
    tol = 64 if dtype == torch.float32 else 1
    assert _ulps(got, want) <= tol, (got - want).abs().max()


def test_rms_norm_kernel_per_head_view():
    """Qwen3's q/k norms run on a strided [T, H, D] view of the fused qkv output."""
    qkv = torch.randn(3, 4 * 32 + 2 * 32, device=DEV)
    q = qkv[:, : 4 * 32].view(3, 4, 32)
    w = torch.rand(32, device=DEV) + 0.5
    got, _ = fused_ops._rms_norm_triton(q, w, 1e-6, None)
    assert got.shape == q.shape
    torch.testing.assert_close(got, fused_ops.rms_norm_torch(q, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_silu_and_mul_kernel_matches_torch(dtype):
    x = torch.randn(4, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    got = fused_ops._silu_and_mul_triton(x)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert _ulps(got, want) <= 1


def test_cpu_path_is_the_torch_reference():
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    y, res = fused_ops.rms_norm(x, w, 1e-5, r)
    want, want_res = _ref_norm(x, w, 1e-5, r)
    assert torch.equal(y, want) and torch.equal(res, want_res)


# ---------------------------------------------------------------- quantized outputs (fp8 linears)


def _unfused_rows(y):
    from pagedbatch.engine.models.fp8 import quantize_per_token_triton

    return quantize_per_token_triton(y)


def _same_rows(got, y):
    """``got`` (Fp8Rows) holds the bits of the quantize kernel run on the unquantized output ``y``."""
    q, s = _unfused_rows(y)
    assert got.dtype == y.dtype and got.q.shape == y.shape and got.scale.shape == (y.shape[0], 1)
    assert torch.equal(got.scale, s)
    assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("D", [64, 96])
def test_rms_norm_quantized_output_is_the_norm_then_the_quantize_kernel(dtype, with_residual, D):
    """The norm before an fp8 linear on the _scaled_mm route writes e4m3 rows and scales in the same pass
    (linear.FUSE_FP8_QUANT): the same bits as the norm's output through fp8's quantize kernel, rows of
    very different magnitudes and an all-zero row included."""
    g = torch.Generator().manual_seed(D + 1)
    x = (torch.randn(6, D, generator=g) * torch.logspace(-3, 3, 6)[:, None]).to(dtype).to(DEV)
    x[2] = 0.0
    r = torch.randn(6, D, generator=g).to(dtype).to(DEV) if with_residual else None
    if r is not None:
        r[2] = 0.0
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype).to(DEV)
    y, y_res = fused_ops._rms_norm_triton(x, w, 1e-6, r)
    got, got_res = fused_ops._rms_norm_triton(x, w, 1e-6, r, quant=True)
    _same_rows(got, y)
    assert got.scale[2, 0].item() == 1.0
    if with_residual:
        assert torch.equal(got_res, y_res)
    else:
        assert got_res is None
    with pytest.raises(ValueError, match="2-D"):
        fused_ops._rms_norm_triton(x.view(6, 2, D // 2), w[: D // 2], 1e-6, None, quant=True)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("max_block, n", [(2048, 1500), (2048, 3000), (4096, 3000), (4096, 4096), (4096, 9000)])
def test_silu_and_mul_quantized_output_is_the_activation_then_the_quantize_kernel(dtype, max_block, n, monkeypatch):
    """One block (partial or full, the row kept in registers) and two or three passes (the last partial)."""
    monkeypatch.setattr(fused_ops, "SILU_QUANT_MAX_BLOCK", max_block)
    x = (torch.randn(5, 2 * n, generator=torch.Generator().manual_seed(n)) * 4).to(dtype).to(DEV)
    x[1] = 0.0
    got = fused_ops._silu_and_mul_quant_triton(x)
    _same_rows(got, fused_ops._silu_and_mul_triton(x))
    assert got.scale[1, 0].item() == 1.0


def test_cpu_quantized_outputs_are_the_torch_rule():
    from pagedbatch.engine.models.fp8 import quantize_rows

    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    rows, res = fused_ops.rms_norm(x, w, 1e-5, r, quant=True)
    want, want_res = _ref_norm(x, w, 1e-5, r)
    q, s = quantize_rows(want)
    assert torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rows.scale[:, 0], s)
    assert torch.equal(res, want_res) and rows.dtype == torch.float32
    gu = torch.randn(3, 16)
    rows = fused_ops.silu_and_mul(gu, quant=True)
    q, s = quantize_rows(F.silu(gu[:, :8]) * gu[:, 8:])
    assert torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rows.scale[:, 0], s)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [17, 512])
def test_gpu_quantized_outputs_at_7b_widths(M):
    """bf16, Qwen2.5-7B's hidden size (3,584) and intermediate size (18,944: five passes of the default 4,096
    columns, the last partial), outlier columns: the same bits as the unfused kernels followed by the quantize kernel."""
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    x[:, ::97] *= 30
    r = torch.randn(M, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(3584, device="cuda", generator=g)).to(torch.bfloat16)
    y, _ = fused_ops._rms_norm_triton(x, w, 1e-6, r)
    _same_rows(fused_ops._rms_norm_triton(x, w, 1e-6, r, quant=True)[0], y)
    gu = torch.randn(M, 2 * 18944, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    _same_rows(fused_ops._silu_and_mul_quant_triton(gu), fused_ops._silu_and_mul_triton(gu))
