"""bench/prefill_attention.py runs end to end on the CPU (kernels in Triton's interpreter, tiny shapes): the
tile sweep a GPU call will run, with random lengths, and each tile's result checked against the default's."""
import re

import pytest

pytest.importorskip("triton")

from bench_scripts import load_bench  # noqa: E402


def test_prefill_bench_sweeps_tiles_over_random_lengths_and_each_tile_agrees(capsys):
    bench = load_bench("prefill_attention")
    assert bench.main(["--seqs", "2", "--lens", "5,40", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                       "--tiles", "bm32 bn16 w4 st1,bm128 bn128 w8 st3"]) == 0
    out = capsys.readouterr().out
    assert "2 sequences of " in out and "4 q / 2 kv heads" in out
    assert "of which paged attention, tile bm64 bn64 w4 st2 (the default)" in out
    diffs = re.findall(r"paged attention, tile (bm\d+ bn\d+ w\d+ st\d+) \(max \|diff\| ([0-9.e+-]+)\)", out)
    assert [t for t, _ in diffs] == ["bm32 bn16 w4 st1", "bm128 bn128 w8 st3"], out
    assert all(float(d) < 1e-4 for _, d in diffs), out
