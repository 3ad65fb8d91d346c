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


def test_fp8_cache_write_divides_without_a_slow_path_call_per_element_on_sm90():
    """The fused rotary + cache write quantizes every K and V element by one scale: per element div_rn
    compiled to a branchy sequence with a slow-path call (16 CALLs a program for W-nano's heads; the kernel
    took 9.0 us per decode call on the H200 against 3.6 without them, bench/cache_write.py). The reciprocals
    of the two scales are computed once a program (div_rn: at most a call each), each element takes a
    multiply and an fma correction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), "--kernel", "rotary", "--kv", "fp8", "--group", "2",
                          "--v-layout", "key-contiguous", "--top", "200"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"^no loop; (\d+) instructions: (.*)$", out.stdout, re.M)
    assert m, out.stdout
    assert "F2FP.SATFINITE.E4M3" in m.group(2)  # it is the fp8 write
    calls = sum(int(n) for n in re.findall(r"CALL\S* (\d+)", m.group(2)))
    assert calls <= 2, m.group(2)


def test_fp8_decode_tile_converts_before_its_layout_change_on_sm90():
    paired, paired_ops = _loop("v2-stages3")
    cast, cast_ops = _loop("v2-stages3-cast")
    assert "HMMA" in paired_ops and "F2FP.F16.E4M3" in paired_ops
    assert "LDS.U8" not in paired_ops and "LDS.U8" in cast_ops
    assert paired < 0.75 * cast, (paired, cast)


def test_mid_gemm_prefill_tiles_run_on_the_warpgroup_mma_without_spilling_on_sm90():
    """bench/mid_gemm.py's 128-row tiles for steps with prefill (TILES_LARGE): compiled for sm_90, the K loop runs
    on Hopper's fp8 warpgroup MMA (QGMMA) and nothing goes to the stack. 256-column tiles, left out of the sweep,
    spilled (local loads in the loop) when this was written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), "--kernel", "mid", "--mid-config", "bm128 bn128 bk128 g8 w8 st3",
                          "--n", "6144", "--k", "1024", "--top", "40"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"registers \d+, stack 0 B,", out.stdout), out.stdout
    m = re.search(r"^loop 0: (\d+) instructions: (.*)$", out.stdout, re.M)
    assert m, out.stdout
    assert "QGMMA" in m.group(2) and "E4M3.E4M3" in m.group(2)
    assert "LDL" not in m.group(2) and "STL" not in m.group(2)



def _skinny_loop(config: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), "--kernel", "skinny", "--kv", "fp8", "--n", "4608", "--k", "3584",
                          "--pdl", "--skinny-config", config, "--top", "40"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"^loop 0: (\d+) instructions: (.*)$", out.stdout, re.M)
    assert m, out.stdout
    return int(m.group(1)), m.group(2)


def test_unrolled_one_row_fp8_skinny_loop_takes_fewer_instructions_a_tile_on_sm90():
    """SkinnyConfig.unroll reaches the compiled loop (the interpreter does not unroll): twice unrolled, the fp8 fma
    loop body holds two tiles' conversions and multiply-adds and fewer instructions a tile than one tile's loop
    (131 against ~115 with Triton 3.6)."""
    one, one_ops = _skinny_loop("fma bm1 bn8 bk512 sk1 w4 st4")
    two, two_ops = _skinny_loop("fma bm1 bn8 bk512 sk1 w4 st4 u2")
    ffma = [int(re.search(r"\bFFMA (\d+)", ops).group(1)) for ops in (one_ops, two_ops)]
    assert ffma == [32, 64], (one_ops, two_ops)
    assert two / 2 < 0.95 * one, (one, two)


def test_prefill_v_tiles_store_along_the_tokens_without_spilling_on_sm90():
    """``v_tile`` (prefill into a key-contiguous fp8 V cache): where a tile's tokens fill consecutive slots of
    a block, a warp's 32 lanes store 32 consecutive tokens' bytes of one head_dim row (one sector a store), not
    32 head_dim rows of one token (32 sectors); token by token, no store walks the tokens. The tile, taken in
    head_dim chunks, compiles without spilling (a whole [64, 128] tile took 255 registers and spilled, for
    every program of the kernel; chunked, Triton 3.6 gives 40 registers against 48 token by token, 3.9 64
    against 52)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base = [sys.executable, str(BENCH), "--kernel", "rotary", "--kv", "fp8", "--group", "2", "--v-layout",
            "key-contiguous", "--block-size", "64", "--store-layouts"]
    text = {}
    for tile in (0, 64):
        out = subprocess.run(base + ["--v-tile", str(tile)], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        m = re.search(r"^registers (\d+), stack (\d+) B", out.stdout, re.M)
        assert m, out.stdout
        assert int(m.group(2)) == 0 and int(m.group(1)) <= 96, (tile, m.group(0))
        text[tile] = out.stdout
    along_tokens = re.compile(r"^store 64x\d+ f8E4M3FN: .*threadsPerWarp = \[32, 1\].*order = \[0, 1\]", re.M)
    assert along_tokens.search(text[64]), text[64]
    assert not re.search(r"^store 64x", text[0], re.M), text[0]
