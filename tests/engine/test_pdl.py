"""Programmatic dependent launch (engine/pdl.py): a kernel may start while its predecessor runs, so what it
reads before its wait and what it computes after must be exactly what it would without PDL.

CPU: PDL is off off Hopper; the sm_90 machine code of the skinny GEMM and the decode kernel (compiled on
the CPU by bench/kernel_sass.py) waits for the producer after loading only weights. GPU (``-m gpu``): chains
of our kernels, eager and replayed in a CUDA graph, give the same bits with PDL as without.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedbatch.engine import pdl  # noqa: E402
from pdl_chain import assert_chain_under_pdl_gives_the_bits_without_pdl  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_sass.py"


def test_pdl_is_off_for_cpu_tensors():
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_kwargs("cpu") == {}


def test_pdl_is_off_when_triton_interprets_even_for_cuda_devices():
    if not pdl._interpreted():
        pytest.skip("kernels are compiled in this session (TRITON_INTERPRET unset)")
    assert not pdl.enabled(torch.device("cuda"))  # decided before asking a (possibly absent) GPU anything


def _pdl_line(*args: str) -> str:
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no grid dependency control (triton.language.extra.cuda.gdc_wait)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), *args, "--pdl"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"^pdl: wait at instruction (\d+), (\d+) global loads before it .*; dependents released at (-?\d+)$",
                  out.stdout, re.M)
    assert m, out.stdout
    return m


@pytest.mark.parametrize("weight", ["bf16", "fp8"])
def test_skinny_gemm_loads_its_first_weight_tile_before_waiting_for_x_on_sm90(weight):
    # Qwen2.5-7B's qkv at one row: an 8 x 256 (bf16) / 8 x 512 (fp8) tile is 4 KB, two 16-byte loads per thread.
    m = _pdl_line("--kernel", "skinny", "--kv", weight, "--m", "1", "--n", "4608", "--k", "3584")
    wait, loads_before, released = map(int, m.groups())
    assert loads_before == 2, m.group(0)
    assert released > wait, m.group(0)  # dependents launch only once this kernel's producer is done


def test_decode_kernel_waits_before_any_global_load_on_sm90():
    m = _pdl_line("--kernel", "decode", "--config", "v2-stages3", "--kv", "bf16", "--group", "7", "--splits", "16")
    wait, loads_before, released = map(int, m.groups())
    assert loads_before == 0 and released > wait, m.group(0)


# --------------------------------------------------------------------------- GPU


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


L, D, F = 6, 2048, 5632  # the GPU chains' layers, hidden and intermediate sizes


def _chain_weights(seed: int):
    """(rnd, norm weights [2L + 1], qkv, o, gate_up, down [L each]): random bf16 layers for a PDL chain."""
    if not _hopper() or pdl.gdc_wait is None:
        pytest.skip("PDL needs compute capability 9.0+ and Triton with grid dependency control")
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return (rnd, [1 + rnd(D) for _ in range(2 * L + 1)], [rnd(D + 512, D) for _ in range(L)],
            [rnd(D, D) for _ in range(L)], [rnd(2 * F, D) for _ in range(L)], [rnd(D, F) for _ in range(L)])


@pytest.mark.gpu
def test_gpu_pdl_kernel_chain_in_a_cuda_graph_gives_the_bits_of_the_chain_without_pdl(monkeypatch):
    rnd, norm_w, qkv, o, up, down = _chain_weights(0)
    from pagedbatch.engine.models import skinny_gemm as sg
    from pagedbatch.engine.models.fused_ops import rms_norm, silu_and_mul

    split = sg.SkinnyConfig.parse("fma bm1 bn8 bk256 sk4 w4 st4")  # the split-K counters under PDL too

    def chain(x):
        res = x
        h = rms_norm(x, norm_w[0], 1e-6)[0]
        for i in range(L):
            a = sg.skinny_linear(h, qkv[i])[:, :D]
            x = sg.skinny_linear(a.contiguous(), o[i], config=split)
            h, res = rms_norm(x, norm_w[2 * i + 1], 1e-6, res)
            gu = sg.skinny_linear(h, up[i])
            x = sg.skinny_linear(gu, down[i], act="silu_mul") if i % 2 else sg.skinny_linear(silu_and_mul(gu), down[i])
            h, res = rms_norm(x, norm_w[2 * i + 2], 1e-6, res)
        return h

    inputs = [rnd(1, D, scale=1.0) for _ in range(8)]
    assert_chain_under_pdl_gives_the_bits_without_pdl(chain, inputs, monkeypatch)


@pytest.mark.gpu
def test_gpu_pdl_chain_of_norm_fused_matmuls_gives_the_bits_without_pdl(monkeypatch):
    """skinny_norm_linear's residual add, its stored residual and its split sums of squares under PDL: every
    kernel reads x and the residual only after its wait."""
    rnd, norm_w, qkv, o, up, down = _chain_weights(1)
    from pagedbatch.engine.models import skinny_gemm as sg

    split = sg.SkinnyConfig.parse("fma bm1 bn8 bk256 sk4 w4 st4")

    def chain(x):
        res = None
        for i in range(L):
            a, res = sg.skinny_norm_linear(x, sg.RMSNormIn(res, norm_w[2 * i], 1e-6), qkv[i])
            res = x if res is None else res
            x = sg.skinny_linear(a[:, :D].contiguous(), o[i])
            gu, res = sg.skinny_norm_linear(x, sg.RMSNormIn(res, norm_w[2 * i + 1], 1e-6), up[i],
                                            config=split if i % 2 else None)
            x = sg.skinny_linear(gu, down[i], act="silu_mul")
        return x + res

    inputs = [rnd(1, D, scale=1.0) for _ in range(8)]
    assert_chain_under_pdl_gives_the_bits_without_pdl(chain, inputs, monkeypatch)
