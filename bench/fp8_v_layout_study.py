"""Offline study for the next fp8 decode kernel: which V-tile layout lets P @ V read fp8 through ldmatrix?

    python bench/fp8_v_layout_study.py        # with triton==3.6.0 (the GPU machine's) for the exact code

The fp8 KV decode kernel is bound by shared-memory traffic (ncu, docs/benchmarks.md 2026-12-04): V is the
[keys, head_dim] B operand of P @ V, which the MMA wants key-contiguous, so an 8-bit V tile stored
[keys, head_dim] is either read from shared memory a byte at a time (Triton's cast) or converted to fp16 first
and sent through shared memory again (the paired conversion, today's default). This compiles a minimal
attention loop (16 query rows, 64-key tiles, head_dim 128, 3 stages, 4 warps) for sm_90 on the CPU machine,
with V stored [keys, D] as in our cache or key-contiguous ([D, keys], and per 16-key block through a block
table), and prints the loop's instruction count and its shared-memory and conversion instructions
(``bench/kernel_sass.py``'s SASS reader). A study, not a kernel of the engine: instruction counts are not
times; a kernel built on it must be measured on the GPU (bench/decode_attention.py) before it is a default.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernel_sass import _tool, loops  # noqa: E402

SHOWN = r"(LDS|STS|LDSM|STSM|LDGSTS|HMMA|F2FP|PRMT|BAR)"


@triton.jit
def _attn(Q, K, V, O, BT, n_tiles, s_k, s_v, D: tl.constexpr, BN: tl.constexpr, V_LAYOUT: tl.constexpr):
    # V_LAYOUT 0: V [keys, D] (our cache); 1: V [D, keys], contiguous; 2: per 16-key block [D, 16], via BT.
    offs_g = tl.arange(0, 16)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    q = tl.load(Q + offs_g[:, None] * D + offs_d[None, :])
    acc = tl.zeros([16, D], tl.float32)
    m = tl.full([16], float("-inf"), tl.float32)
    l = tl.zeros([16], tl.float32)
    for t in tl.range(0, n_tiles, num_stages=3):
        keys = t * BN + offs_n
        k = tl.load(K + keys[:, None] * s_k + offs_d[None, :])
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if V_LAYOUT == 0:
            v = tl.load(V + keys[:, None] * s_v + offs_d[None, :])
            pv = tl.dot(p.to(tl.float16), v.to(tl.float16))
        else:
            if V_LAYOUT == 1:
                vt = tl.load(V + offs_d[:, None] * s_v + keys[None, :])
            else:
                blk = tl.load(BT + keys // 16).to(tl.int64)
                vt = tl.load(V + blk[None, :] * s_v + offs_d[:, None] * 16 + (offs_n % 16)[None, :])
            pv = tl.dot(p.to(tl.float16), tl.trans(vt).to(tl.float16))
        acc = acc * alpha[:, None] + pv
        m = m_new
    tl.store(O + offs_g[:, None] * D + offs_d[None, :], acc / l[:, None])


def compile_loop(kv: str, v_layout: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(_attn.arg_names)
    sig = {"Q": "*fp16", "K": f"*{kv}", "V": f"*{kv}", "O": "*fp32", "BT": "*i32", "n_tiles": "i32", "s_k": "i32",
           "s_v": "i32", "D": "constexpr", "BN": "constexpr", "V_LAYOUT": "constexpr"}
    const = {(names.index("D"),): 128, (names.index("BN"),): 64, (names.index("V_LAYOUT"),): v_layout}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ("Q", "K", "V", "O", "BT", "s_k", "s_v")}
    c = triton.compile(ASTSource(_attn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=3))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    n, ops = loops(sass)[0]
    shown = ", ".join(f"{k} {v}" for k, v in ops.most_common() if re.match(SHOWN, k))
    regs = re.search(r"REG:(\d+)", res)
    return f"{n} instructions, {regs.group(1) if regs else '?'} registers: {shown}"


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(f"triton {triton.__version__}, sm_90, one 64-key tile of the loop:")
    layouts = {0: "V [keys, D] (our cache)", 1: "V [D, keys]", 2: "V [D, 16 keys] per block, via a block table"}
    for kv, label in (("fp16", "fp16 cache"), ("fp8e4nv", "fp8 cache")):
        for v_layout, name in layouts.items():
            print(f"{label:<11} {name:<46} {compile_loop(kv, v_layout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
