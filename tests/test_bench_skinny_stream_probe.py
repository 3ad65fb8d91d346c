"""bench/skinny_stream_probe.py runs end to end on the CPU (its kernel in Triton's interpreter, a tiny shape): the
probe a GPU call will run, with its full-math kernel and the engine's skinny GEMM checked against a float32
reference before anything would be timed."""
import re

import pytest

pytest.importorskip("triton")

from bench_scripts import load_bench  # noqa: E402


def test_stream_probe_runs_every_mode_and_its_fma_kernel_matches_the_engine(capsys):
    bench = load_bench("skinny_stream_probe")
    assert bench.main(["--device", "cpu", "--tiles", "8:512:4:4,16:256:4:2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^tiny\s+(fp8|bf16)\s+(engine default|\d+:\d+:\d+:\d+)\s+(\w+)\s+ok(?:\s+err ([0-9.e+-]+))?$",
                      out, re.M)
    seen = {(kind, tile, mode) for kind, tile, mode, _ in rows}
    for kind in ("fp8", "bf16"):
        assert (kind, "engine default", "engine") in seen, out
        for tile in ("8:512:4:4", "16:256:4:2"):
            assert {(kind, tile, m) for m in ("full", "half", "load")} <= seen, out
    errs = [float(e) for _, _, mode, e in rows if mode in ("engine", "full")]
    assert len(errs) == 6 and max(errs) < 1e-2, out


def test_stream_probe_refuses_a_tile_that_does_not_divide_the_rows():
    bench = load_bench("skinny_stream_probe")
    with pytest.raises(SystemExit, match="not a whole number of 384-byte tiles"):
        bench.main(["--device", "cpu", "--kinds", "fp8", "--tiles", "8:384:4:4"])
