"""bench/silu_quant.py runs on the CPU (Triton's interpreter, a tiny shape): it checks every SiLU·mul + quantize
variant it times against the unfused pair's bits (rows kept in registers and rows taken in passes), and says so."""
import pytest

pytest.importorskip("triton")

from bench_scripts import load_bench  # noqa: E402


def test_silu_quant_bench_checks_each_fused_variant_against_the_unfused_bits(capsys):
    bench = load_bench("silu_quant")
    assert bench.main(["--device", "cpu", "--max-blocks", "32,128"]) == 0  # tiny intermediate 96: 3 passes; 1
    out = capsys.readouterr().out
    assert "fused@32,128: the same e4m3 bits and scales as silu+quant in every case" in out, out
    assert out.splitlines()[0].split()[3:] == ["silu", "silu+quant", "fused@32", "fused@128", "norm", "norm+quant",
                                               "quant"], out
