"""What the GPU will run, read on a machine without one: compile an attention kernel for sm_90 and count the
instructions of its loops.

    python bench/kernel_sass.py --kernel decode --config v2-stages3 --kv fp8 --group 2
    python bench/kernel_sass.py --kernel decode --config v2-stages3-cast --kv fp8 --group 2 --out /tmp/sass
    python bench/kernel_sass.py --kernel prefill --kv fp8 --group 7
    python bench/kernel_sass.py --kernel skinny --kv fp8 --n 4608 --k 3584 --pdl
    python bench/kernel_sass.py --kernel decode --config v2-stages3-cast --kv fp8 --v-layout key-contiguous
    python bench/kernel_sass.py --kernel mid --mid-config 'bm128 bn128 bk128 g8 w8 st3' --k 1024

Triton compiles for any NVIDIA target without a GPU (its wheel carries ptxas and nvdisasm). The kernel is
compiled as the engine launches it: the same constexprs as the launcher, pointers and strides assumed
divisible by 16 as Triton's runtime specializes them (except the arguments a kernel marks
``do_not_specialize``); without that the code has unvectorized loads and spills the GPU never runs. Prints
registers, shared memory and, per loop (a backward branch in the SASS), its instruction count and the most
frequent opcodes: e.g. the fp8 decode tile went from 657 instructions (a byte-wise shared-memory read of the
V tile) to 388 (docs/benchmarks.md, 2026-12-04). The GPU machine runs Triton 3.6: install that version in a
side virtual environment for the exact code (other versions differ in detail). Instruction counts are not
times; the GPU still decides (bench/decode_attention.py).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POINTER_TYPES = {  # argument name -> Triton pointer type; {kv} is the cache's element type
    "decode": {"Q": "*{q}", "K": "*{kv}", "V": "*{kv}", "O": "*{q}", "WO": "*fp32", "WLSE": "*fp32",
               "block_tables": "*i32", "seq_lens": "*i32", "KV_SCALE": "*fp32"},
    "prefill": {"Q": "*{q}", "K": "*{kv}", "V": "*{kv}", "O": "*{q}", "block_tables": "*i32", "seq_lens": "*i32",
                "query_start_loc": "*i32", "KV_SCALE": "*fp32"},
    "rotary": {"Q": "*{q}", "K": "*{q}", "V": "*{q}", "QO": "*{q}", "KC": "*{kv}", "VC": "*{kv}", "cos_sin": "*fp32",
               "positions": "*i64", "slot_mapping": "*i64", "KV_SCALE": "*fp32", "QW": "*{q}", "KW": "*{q}"},
    "skinny": {"X": "*{q}", "W": "*{kv}", "S": "*fp32", "B": "*{q}", "Y": "*{q}", "WS": "*fp32", "LOCKS": "*i32",
               "R": "*{q}", "RO": "*{q}", "NW": "*{q}", "WSQ": "*fp32", "CS": "*fp32", "POS": "*i64", "SLOT": "*i64",
               "KC": "*{q}", "VC": "*{q}", "KVS": "*fp32"},
    "mid": {"X": "*fp8e4nv", "XS": "*fp32", "W": "*fp8e4nv", "WS": "*fp32", "B": "*{q}", "Y": "*{q}"},
}
FLOAT_ARGS = {"qk_scale", "eps", "x_scale"}
TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8e4nv", "fp32": "fp32"}


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def decode_spec(args):
    """(kernel, constexprs, num_warps, num_stages) as ``triton_decode._launch`` would launch them (an sm_89+
    GPU: the paired fp8 conversion runs)."""
    import torch

    from pagedbatch.engine.attention import triton_decode as td

    cfg = td.DECODE_CONFIGS[args.config]
    if cfg.kernel != "v2":
        raise SystemExit(f"kernel_sass: only v2 decode configs are supported, {args.config} is {cfg.kernel}")
    const = td.v2_constexprs(cfg, args.group, args.head_dim, args.block_size, args.splits,
                             getattr(torch, TORCH_DTYPES[args.q]), args.kv == "fp8", paired_fp8_cvt=True,
                             fp8_mma_runs=args.arch >= 89,
                             v_key_contiguous=args.v_layout == "key-contiguous")
    args.maxnreg = cfg.max_registers
    return td._decode_v2_kernel, {**const, "PDL": args.pdl, **v_strides(args)}, cfg.num_warps, cfg.num_stages


def v_strides(args) -> dict:
    """The V cache stride Triton's runtime specializes to the constant 1 (an int argument equal to 1 is one):
    head_dim for our cache layout, the key within a block for a key-contiguous V (``--v-layout``)."""
    return {"s_vd": 1} if args.v_layout == "keys-last" else {"s_vs": 1}


def rotary_spec(args):
    """The fused rotary + cache write as ``rotary_cache_write`` launches it: W-nano's heads (16 q, 8 kv, Qwen3's
    q/k norms) for ``--group 2``, else 4 KV heads of ``group`` queries each (Qwen2.5-7B's 28 / 4 for 7)."""
    import triton

    kvh = 8 if args.group == 2 else 4
    h = kvh * args.group
    d = args.head_dim
    block_h = min(triton.next_power_of_2(max(h, kvh)), max(1, 2048 // d))
    const = dict(H=h, KVH=kvh, NUM_Q_BLOCKS=triton.cdiv(h, block_h), BLOCK_SIZE=args.block_size, HALF=d // 2,
                 BLOCK_H=block_h, BLOCK_KVH=min(triton.next_power_of_2(kvh), block_h), KV_SCALED=args.kv == "fp8", QK_NORM=args.group == 2, PDL=args.pdl,
                 V_TILE=args.v_tile, **({"s_vcs": 1} if args.v_layout == "key-contiguous" else {"s_vcd": 1}))
    return tk_rotary(), const, 4 if block_h * d >= 2048 else 2, 3


def tk_rotary():
    from pagedbatch.engine.attention import triton_kernels as tk

    return tk._rotary_cache_write_kernel


def skinny_spec(args):
    """The skinny GEMM as ``skinny_gemm._launch`` launches it for an [M, K] x [N, K]^T product with its
    default config (``--kv`` is the weight's type: bf16 or fp8)."""
    import torch

    from pagedbatch.engine.models import skinny_gemm as sg

    wdtype = sg.FP8 if args.kv == "fp8" else getattr(torch, TORCH_DTYPES[args.q])
    cfg = (sg.SkinnyConfig.parse(args.skinny_config) if args.skinny_config
           else sg.default_config(args.m, args.n, args.k, wdtype))
    per_split, split = sg.split_plan(args.k, cfg)
    const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
                 USE_DOT=cfg.kind != "fma", SWAP_AB=cfg.kind == "dotT", F16_DOT=cfg.kind == "dotH",
                 W_FP8=args.kv == "fp8", HAS_BIAS=False,
                 SILU_MUL=False, EVEN_K=args.k % cfg.block_k == 0, NUM_STAGES=cfg.num_stages, UNROLL=cfg.unroll,
                 DOT_IEEE=args.q == "fp32", PDL=args.pdl, NORM=args.norm, HAS_RES=args.norm,
                 ROPE=args.rope, HALF=64 if args.rope else 1, CACHE_BLOCK=16 if args.rope else 1, KV_SCALED=False,
                 EXACT_MUL=args.rope,
                 **sg.prefetch_constexprs(args.k, wdtype.itemsize, per_split, cfg, args.l2_prefetch))
    return sg._skinny_kernel, const, cfg.num_warps, cfg.num_stages


def mid_spec(args):
    """mid_gemm's fp8 x fp8 kernel as ``mid_linear`` launches it with ``--mid-config`` (default: its config for
    ``--m`` rows of an [--n, --k] weight), output in ``--q``, no bias: registers, shared memory, spills and
    whether the K loop runs on Hopper's warpgroup MMA (``QGMMA``) before a GPU sweep times the tile."""
    from pagedbatch.engine.models import mid_gemm as mg

    cfg = mg.MidConfig.parse(args.mid_config) if args.mid_config else mg.default_config(args.m, args.n, args.k)
    if cfg is None:
        raise SystemExit(f"kernel_sass: no mid_gemm config for M={args.m}, N={args.n}, K={args.k}: pass --mid-config")
    const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                 IMPRECISE=min(mg._PROMOTE_EVERY, cfg.block_k), HAS_BIAS=False, EVEN_K=args.k % cfg.block_k == 0,
                 NUM_STAGES=cfg.num_stages, PDL=args.pdl)
    return mg._mid_kernel, const, cfg.num_warps, cfg.num_stages


def prefill_spec(args):
    """The same for ``paged_prefill``'s kernel with its default tile (queries long enough to fill it)."""
    from pagedbatch.engine.attention import triton_kernels as tk

    group = args.group
    block_m = tk.prefill_block_m(args.block_m, group, max_query_len=args.block_m)
    const = dict(GROUP=group, D=args.head_dim, BLOCK_SIZE=args.block_size, BLOCK_M=block_m, BLOCK_Q=block_m // group,
                 BLOCK_N=args.block_n, PREC="ieee" if args.q == "fp32" else "tf32", KV_SCALED=args.kv == "fp8",
                 F16=args.kv == "fp8" and args.q != "fp32",
                 V_KEYS=min(args.block_n, args.block_size) if args.v_layout == "key-contiguous" else 0)
    return tk._prefill_kernel, {**const, **v_strides(args)}, args.num_warps, args.num_stages


def compile_for(kernel, const: dict, kind: str, q: str, kv: str, arch: int, num_warps: int, num_stages: int,
                fp_fusion: bool = True, maxnreg: int = 0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    unknown = set(const) - set(names)
    if unknown:
        raise SystemExit(f"kernel_sass: {kernel.__name__} has no argument(s) {sorted(unknown)}: the launcher changed")
    dns = {names[d] if isinstance(d, int) else d for d in getattr(kernel, "do_not_specialize", ())}
    ptrs = POINTER_TYPES[kind]
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
            continue
        sig[n] = (ptrs[n].format(q=TRITON_TYPES[q], kv=TRITON_TYPES[kv]) if n in ptrs
                  else "fp32" if n in FLOAT_ARGS else "i32")
        if n not in FLOAT_ARGS and n not in dns and n != "KV_SCALE" and not n.startswith("num_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, {(names.index(k),): v for k, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=fp_fusion,
                                       **({"maxnreg": maxnreg} if maxnreg else {})))


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instruction count, opcode counts) of each loop: the instructions from a label to a branch back to it."""
    labels, insts = {}, []
    for line in sass.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            insts.append(m.group(1).strip())
    out = []
    for idx, ins in enumerate(insts):
        m = re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.?(L_x_\d+)", ins)
        if m and m.group(1) in labels and labels[m.group(1)] < idx:
            body = insts[labels[m.group(1)]: idx + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0] for b in body)
            out.append((len(body), ops))
    return out


def store_layouts(ttgir: str) -> str:
    """One line per ``tt.store``: its pointer tensor's shape and element type, and its blocked layout
    (sizePerThread, threadsPerWarp, warpsPerCTA, order: the first axis in ``order`` is the one a warp's
    consecutive lanes walk)."""
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*?)\}>", ttgir, re.M))
    lines = []
    for m in re.finditer(r"tt\.store .*?: tensor<([0-9x]+)x!tt\.ptr<(\w+)>, (#\w+)>", ttgir):
        lines.append(f"store {m.group(1)} {m.group(2)}: {layouts.get(m.group(3), m.group(3))}")
    return "\n".join(lines) or "no tensor stores"


def pdl_order(sass: str) -> str:
    """Where the grid-dependency wait falls (``griddepcontrol.wait`` is SASS ``ACQBULK``, ``launch_dependents``
    ``PREEXIT``): the global loads issued before it may read constants only (engine/pdl.py's rule)."""
    ops = [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", sass)]
    opcode = [re.sub(r"^@!?U?P\w+\s+", "", o).split()[0] for o in ops]
    waits = [i for i, o in enumerate(opcode) if o == "ACQBULK"]
    if not waits:
        return "pdl: no grid-dependency wait (ACQBULK) in the SASS"
    w = waits[0]
    loads = [i for i, o in enumerate(opcode) if o.startswith("LDG")]
    trigger = min((i for i, o in enumerate(opcode) if o == "PREEXIT"), default=-1)
    return (f"pdl: wait at instruction {w}, {sum(1 for i in loads if i < w)} global loads before it "
            f"({', '.join(ops[i] for i in loads if i < w) or 'none'}); dependents released at {trigger}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=["decode", "prefill", "skinny", "rotary", "mid"], default="decode")
    ap.add_argument("--config", default="v2-stages3", help="decode: a name in DECODE_CONFIGS")
    ap.add_argument("--kv", choices=["bf16", "fp16", "fp8", "fp32"], default="bf16", help="cache element type")
    ap.add_argument("--q", choices=["bf16", "fp16", "fp32"], default="bf16", help="query / model dtype")
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head (W-nano 2, Qwen2.5-7B 7)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--splits", type=int, default=1, help="decode: the split count's SPLIT constexpr (>1: split)")
    ap.add_argument("--block-m", type=int, default=64, help="prefill")
    ap.add_argument("--block-n", type=int, default=64, help="prefill")
    ap.add_argument("--num-warps", type=int, default=4, help="prefill")
    ap.add_argument("--num-stages", type=int, default=2, help="prefill")
    ap.add_argument("--v-layout", choices=["keys-last", "key-contiguous"], default="keys-last",
                    help="decode, prefill: the V cache stored like K ([block, key, head, d]) or with each block's "
                         "keys contiguous ([block, head, d, key], passed as a permuted view: how the engine stores an "
                         "fp8 cache's V under the Triton backend)")
    ap.add_argument("--m", type=int, default=1, help="skinny: rows of x")
    ap.add_argument("--n", type=int, default=4608, help="skinny: output columns (weight rows)")
    ap.add_argument("--k", type=int, default=3584, help="skinny: reduction length")
    ap.add_argument("--skinny-config", default=None, help="skinny: this config (e.g. 'dotH bm16 bn256 bk128 sk1 w4 "
                    "st3') instead of the default for the shape")
    ap.add_argument("--mid-config", default=None, help="mid: this config (e.g. 'bm128 bn128 bk128 g8 w8 st3') "
                    "instead of the table's for --m rows of the [--n, --k] weight")
    ap.add_argument("--l2-prefetch", type=int, default=None, metavar="BYTES",
                    help="skinny: each program's L2 prefetch budget (default: skinny_gemm.L2_PREFETCH_BYTES)")
    ap.add_argument("--norm", action="store_true", help="skinny: with the fused RMSNorm and residual add "
                    "(skinny_norm_linear)")
    ap.add_argument("--rope", action="store_true", help="skinny: with the rotary + bf16 cache write epilogue "
                    "(rope=, head_dim 128, block size 16)")
    ap.add_argument("--pdl", action="store_true", help="decode, skinny: as launched with programmatic dependent "
                                                        "launch (engine/pdl.py); prints where the wait falls")
    ap.add_argument("--v-tile", type=int, default=0, help="rotary: V written by tiles of this many tokens (prefill's "
                                                          "PREFILL_V_TILE; 0: token by token)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--top", type=int, default=14, help="opcodes shown per loop")
    ap.add_argument("--out", default=None, help="also write the PTX and SASS here")
    ap.add_argument("--store-layouts", action="store_true",
                    help="also print each global store's tensor type and layout (TTGIR): which axis a warp's lanes "
                         "walk decides how many memory sectors a store instruction touches")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's default; silences Triton >= 3.9
    import triton

    spec = {"decode": decode_spec, "prefill": prefill_spec, "skinny": skinny_spec, "rotary": rotary_spec,
            "mid": mid_spec}[args.kernel]
    kernel, const, warps, stages = spec(args)
    # The rotary kernel's fp8 write is compiled without fused multiply-adds, as its launcher asks.
    compiled = compile_for(kernel, const, args.kernel, args.q, args.kv, args.arch, warps, stages,
                           fp_fusion=not (args.kernel == "rotary" and args.kv == "fp8"),
                           maxnreg=getattr(args, "maxnreg", 0))
    cubin = compiled.asm["cubin"]
    tmp = os.path.join(args.out or "/tmp", f"kernel_sass-{os.getpid()}.cubin")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([_tool("nvdisasm"), "-c", tmp], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", tmp], capture_output=True, text=True, check=True).stdout
    if args.out:
        name = {"decode": args.config, "prefill": "prefill", "skinny": f"m{args.m}n{args.n}k{args.k}",
                "rotary": f"g{args.group}", "mid": f"n{args.n}k{args.k}"}[args.kernel]
        base = os.path.join(args.out, f"{args.kernel}-{name}-{args.kv}")
        for ext, text in (("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(f"{base}.{ext}", "w") as f:
                f.write(text)
        print(f"wrote {base}.ptx and .sass")
    else:
        os.remove(tmp)
    regs = re.search(r"REG:(\d+)", res)
    spill = re.search(r"STACK:(\d+)", res)
    print(f"{kernel.__name__} sm_{args.arch} (triton {triton.__version__}), {warps} warps, {stages} stages; "
          f"constexprs {const}")
    from decode_attention import programs_per_sm  # bench/, beside this script

    n_regs = int(regs.group(1)) if regs else 0
    progs, by_regs, by_smem = programs_per_sm(n_regs, compiled.metadata.shared, warps)
    print(f"registers {regs.group(1) if regs else '?'}, stack {spill.group(1) if spill else '?'} B, "
          f"shared memory {compiled.metadata.shared / 1024:.1f} KB; programs per SM: "
          f"{progs} (registers {by_regs}, shared memory {by_smem})")
    if args.pdl:
        print(pdl_order(sass))
    if args.store_layouts:
        print(store_layouts(compiled.asm["ttgir"]))
    found = loops(sass)
    if not found:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip()).split()[0]
                                  for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", sass))
        print(f"no loop; {sum(ops.values())} instructions: "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top)))
    for i, (n, ops) in enumerate(found):
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top))
        print(f"loop {i}: {n} instructions: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
