"""bench/kernel_sass.py compiles the decode kernel for sm_90 on a machine without a GPU and counts its loop.

It pins what the tool is for (docs/benchmarks.md, 2026-12-04): with an fp8 cache the paired conversion keeps
the tile's loop free of byte-wise shared-memory reads and shorter than with Triton's own cast. Runs in a
subprocess: the test session's TRITON_INTERPRET=1 would make every kernel an interpreted one.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernel_sass.py"


def _loop(config: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), "--kernel", "decode", "--config", config, "--kv", "fp8",
                          "--group", "2", "--top", "40"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"^loop 0: (\d+) instructions: (.*)$", out.stdout, re.M)
    assert m, out.stdout
    assert re.search(r"registers \d+, stack \d+ B, shared memory", out.stdout)
    return int(m.group(1)), m.group(2)


def test_fp8_decode_tile_converts_before_its_layout_change_on_sm90():
    paired, paired_ops = _loop("v2-stages3")
    cast, cast_ops = _loop("v2-stages3-cast")
    assert "HMMA" in paired_ops and "F2FP.F16.E4M3" in paired_ops
    assert "LDS.U8" not in paired_ops and "LDS.U8" in cast_ops
    assert paired < 0.75 * cast, (paired, cast)
