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
