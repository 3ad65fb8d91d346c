"""The skinny (small-M) GEMM against cuBLAS bf16 and torch._scaled_mm fp8 on the decode matmuls, one GPU.

    python bench/skinny_gemm.py                        # Qwen2.5-7B, M 1,2,4,8,16,64, bf16 + fp8 (~2-3 min, H200)
    python bench/skinny_gemm.py --quick                # fewer candidate configs, M 1, 4, 16
    python bench/skinny_gemm.py --model-config qwen3-0.6b.json --tp 2 --ms 1,16
    python bench/skinny_gemm.py --plan                 # how many configs and compiles, nothing run
    python bench/skinny_gemm.py --device cpu --quick   # correctness only: Triton interpreter, tiny shapes

Per shape (qkv with its bias, o, gate_up, down, down with the fused silu_mul
prologue, LM head), weight kind (bf16, fp8 with per-channel scales) and M,
every candidate config (chosen below with the reasoning next to it, plus
the module's current default) is first checked against a float32 reference
of the dequantized weights, with NaN-filled outputs and split-K workspaces
(a wrong result is reported, never timed); then it is timed as a CUDA graph
of R calls over R distinct weight copies, R * bytes >= 4x the L2 cache, so
every call reads its weight from HBM; the median of --reps replays.
Then the whole chain (every layer's 4 matmuls + the LM head, layer i using
copy i mod R: still L2-cold) for cuBLAS bf16, ours bf16 (best per shape and
the current defaults), ours fp8 (LM head in bf16, as the engine keeps it),
torch._scaled_mm fp8 (activations quantized beforehand: its GEMMs alone;
LM head cuBLAS bf16), and ours with the MLP activation fused or not.

Compiling ~300 kernel variants serially would take minutes, so they are
compiled first by --jobs worker processes into Triton's on-disk cache.

Prints per-shape tables, the chain table, and at the end the TUNED / MAX_M
entries to paste into pagedbatch/engine/models/skinny_gemm.py. JSON under
bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# pagedbatch is imported inside the functions: the CPU run must set TRITON_INTERPRET before anything imports triton.

FP8 = torch.float8_e4m3fn

# Candidate tiles. fma (M <= 4): (block_n at M = 1, bytes of K per row per tile, warps, stages). One
# warp's 16-byte loads span 512 B of a row; 8-16 rows x 512-1024 B = 4-16 KB per tile; stages 1 leans
# on occupancy alone, 3-4 on the software pipeline. block_n shrinks as block_m grows (accumulator
# registers) but stays >= the warp count so no warp loads a replica.
FMA_TILES = [(16, 512, 4, 4), (8, 512, 4, 4), (32, 512, 8, 4), (16, 1024, 8, 3), (16, 512, 4, 1), (8, 1024, 4, 3)]
# Tensor cores (every M; M padded to 16): (kind, block_n, bytes of K per row, warps, stages). 8-32 KB of
# W per stage; dotT puts block_n on the MMA's M side (64/128 may use wgmma).
DOT_TILES = [("dot", 64, 256, 4, 4), ("dot", 32, 256, 4, 4), ("dotT", 64, 256, 4, 4), ("dot", 128, 256, 4, 3),
             ("dot", 64, 512, 4, 3), ("dotT", 128, 256, 4, 3)]
# fp8 only: the fp16 MMA (one conversion per two weights). Wide column tiles share each x fragment among
# more weights (sm_90 code, bench/kernel_sass.py: 1.7 instructions a weight at 256 x 128 and 4 warps,
# 2.4 at 128 x 128, against fma's 4.1).
DOTH_TILES = [("dotH", 256, 128, 4, 3), ("dotH", 128, 128, 4, 3), ("dotH", 256, 128, 8, 3), ("dotH", 128, 256, 4, 3),
              ("dotH", 64, 256, 4, 4)]


def model_shapes(config_name: str, tp: int) -> tuple[dict, int]:
    """{name: (N, K, has_bias, act)} of one tensor-parallel rank's decode matmuls, and the layer count."""
    from pagedbatch.engine.models.config import ModelArgs
    from pagedbatch.engine.models.sharding import TPShard, local_args

    with open(os.path.join(ROOT, "configs", "models", config_name)) as f:
        a = local_args(ModelArgs.from_hf_dict(json.load(f)), TPShard(0, tp))
    hd, h = a.head_dim, a.hidden_size
    shapes = {"qkv": (hd * (a.num_heads + 2 * a.num_kv_heads), h, a.attention_bias, None),
              "o": (h, hd * a.num_heads, False, None),
              "gate_up": (2 * a.intermediate_size, h, False, None),
              "down": (h, a.intermediate_size, False, None),
              "down+silu": (h, a.intermediate_size, False, "silu_mul"),
              "lm_head": (a.vocab_size, h, False, None)}
    return shapes, a.num_layers


def tiny_shapes(shapes: dict) -> dict:
    """The CPU run's shapes: each dimension / 64 (N at most 256), multiples of 16, so the interpreter is quick."""
    def r(v, cap):
        return min(cap, max(16, -(-(v // 64) // 16) * 16))
    return {k: (r(n, 256), r(kk, 512), b, act) for k, (n, kk, b, act) in shapes.items()}


def candidates(sg, M: int, N: int, K: int, wkind: str, act, num_sms: int, quick: bool, extra_fma=()) -> list:
    """Configs to try for one (M, shape, weight kind): tiles x the split-K counts that make sense, + the default;
    ``extra_fma``: more fma tiles in FMA_TILES' form (``--extra-fma``)."""
    itemsize = 1 if wkind == "fp8" else 2
    mb = sg.m_bucket(M)
    tiles = []
    if mb <= 4:
        for bn1, kbytes, warps, stages, *unroll in FMA_TILES[: 3 if quick else None] + list(extra_fma):
            tiles.append(sg.SkinnyConfig("fma", mb, max(warps, bn1 // mb), kbytes // itemsize, 1, warps, stages,
                                         *unroll))
    for kind, bn, kbytes, warps, stages in (DOT_TILES[: 3 if quick else None]
                                            + (DOTH_TILES[: 3 if quick else None] if wkind == "fp8" else [])):
        tiles.append(sg.SkinnyConfig(kind, max(16, mb), bn, kbytes // itemsize, 1, warps, stages))
    out, seen = [], set()
    for t in tiles:
        # Pipelined tiles live in shared memory (x tile in bf16 + W tile), 227 KB per SM on Hopper: skip
        # what cannot launch rather than report it.
        if t.num_stages * t.block_k * (2 * t.block_m + itemsize * t.block_n) > 200 * 1024:
            continue
        n_tiles = -(-N // t.block_n) * -(-M // t.block_m)
        iters = -(-K // t.block_k)
        # Split only toward 1-8 programs per SM, each split keeping >= 2 K tiles to pipeline.
        splits = [1] + [s for s in (2, 4, 8, 16) if iters // s >= 2 and num_sms <= n_tiles * s <= 8 * num_sms]
        for s in splits[: 2 if quick else None]:
            cfg = sg.SkinnyConfig(t.kind, t.block_m, t.block_n, t.block_k, s, t.num_warps, t.num_stages, t.unroll)
            key = (t, sg.split_plan(K, cfg)[1])
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    default = sg.default_config(M, N, K, FP8 if wkind == "fp8" else torch.bfloat16, act, num_sms)
    if default not in out:
        out.append(default)
    return out


def compile_key(sg, cfg, wkind: str, K: int, has_bias: bool, act) -> tuple:
    """What selects a distinct compiled kernel (N, K, M values do not: M is not specialized, N/K % 16 == 0)."""
    import dataclasses

    split = sg.split_plan(K, cfg)[1] > 1  # the split count itself is a runtime argument
    return (str(dataclasses.replace(cfg, split_k=2 if split else 1)), wkind, has_bias, act, K % cfg.block_k == 0)


# ---------------------------------------------------------------- compiling in worker processes

def _compile_one(spec):
    """Worker: one launch of one kernel variant at a small shape of the same specialization."""
    cfg_text, wkind, N, K, M, has_bias, act = spec
    try:
        from pagedbatch.engine.models import skinny_gemm as sg

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a test of the plumbing
        N = N if N <= 4096 else 4096 + N % 16  # same N % 16, so the same compiled variant
        x = torch.randn(M, 2 * K if act else K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        scale = None
        if wkind == "fp8":
            w, scale = w.to(FP8), torch.ones(N, device=dev)
        b = torch.zeros(N, device=dev, dtype=torch.bfloat16) if has_bias else None
        sg.skinny_linear(x, w, scale, b, act=act, config=sg.SkinnyConfig.parse(cfg_text))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return spec, None
    except Exception as e:  # reported by the parent; the config is then retried (and reported) there
        return spec, f"{type(e).__name__}: {str(e)[:300]}"


def precompile(specs: list, jobs: int, worker=None) -> dict:
    """Compile every spec in ``jobs`` spawned processes (``worker(spec) -> (spec, error or None)``, a module-level
    function: by default this bench's) into Triton's disk cache; {spec: error} of those that failed."""
    if jobs <= 1 or not specs:
        return {}
    t0 = time.time()
    errors = {}
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(specs))) as pool:
            for spec, err in pool.imap_unordered(worker or _compile_one, specs):
                if err:
                    errors[spec] = err
    except Exception as e:  # no worker pool: the main process compiles as it goes
        print(f"precompile skipped ({type(e).__name__}: {e})", flush=True)
        return {}
    print(f"compiled {len(specs)} kernel variants in {time.time() - t0:.1f} s with {jobs} processes"
          f" ({len(errors)} failed)", flush=True)
    return errors


# ---------------------------------------------------------------- timing and checking

def graph_ms(fn, reps: int, warm_s: float = 0.0) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (after ``warm_s`` seconds of untimed replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        g.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def check(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2):
    """None if ``y`` is within ``tol`` x max|ref| of the float32 reference everywhere, else what is wrong."""
    if tuple(y.shape) != tuple(ref.shape):
        return f"shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    y = y.float()
    if not torch.isfinite(y).all():
        return "non-finite output (an element not written, or a NaN partial read)"
    err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return None if err <= tol else f"max error {err:.2e} of max |ref|"


def quantize_rows(t: torch.Tensor):
    """Per-row e4m3 and float32 scales (weights: per output channel; activations: per token)."""
    scale = (t.float().abs().amax(dim=1) / torch.finfo(FP8).max).clamp_min(1e-12)
    return (t.float() / scale[:, None]).clamp(-448, 448).to(FP8), scale


# ---------------------------------------------------------------- the sweep

class Shape:
    """One matmul shape: R weight copies per kind, its bias, inputs for every M, float32 references."""

    def __init__(self, name, N, K, has_bias, act, dev, xdtype, max_m, l2_bytes, cpu, gen, copies=None):
        self.name, self.N, self.K, self.has_bias, self.act = name, N, K, has_bias, act
        self.bytes = {"bf16": 2 * N * K, "fp8": N * K}
        self.copies = copies or {}
        for kind in ("bf16", "fp8"):
            if kind in self.copies:
                continue
            r = 1 if cpu else max(2, min(128, math.ceil(4 * l2_bytes / self.bytes[kind])))
            ws = []
            for _ in range(r):
                w = torch.randn(N, K, device=dev, generator=gen) * 0.02
                ws.append(quantize_rows(w) if kind == "fp8" else (w.to(torch.bfloat16).to(xdtype), None))
            self.copies[kind] = ws
        self.bias = torch.randn(N, device=dev, generator=gen).to(xdtype) if has_bias else None
        self.x = torch.randn(max_m, 2 * K if act else K, device=dev, generator=gen).to(xdtype)
        self._refs = {}

    def operand(self):
        """The activation the weight multiplies (after silu_mul for the fused shape), float32, all rows."""
        x = self.x.float()
        if self.act:
            gate, up = x.chunk(2, dim=-1)
            # silu rounded to x's dtype, then the product: where silu_and_mul (and the kernel) round.
            x = (F.silu(gate).to(self.x.dtype).float() * up).to(self.x.dtype).float()
        return x

    def reference(self, kind, M):
        """float32 ``x[:M] @ dequantized(copy 0).T + bias`` (rows are independent: computed once for all M)."""
        if kind not in self._refs:
            w, s = self.copies[kind][0]
            wf = w.float() * s[:, None] if s is not None else w.float()
            y = self.operand() @ wf.T
            self._refs[kind] = y + self.bias.float() if self.bias is not None else y
            del wf
        return self._refs[kind][:M]


def run_sweep(args, sg, dev, xdtype, shapes, num_sms, l2_bytes, cpu):
    gen = torch.Generator(device=dev).manual_seed(0)
    max_m = max(args.ms)
    data = {}
    for name, (N, K, b, act) in shapes.items():
        same = data.get("down").copies if name == "down+silu" and "down" in data else None  # same weights
        data[name] = Shape(name, N, K, b, act, dev, xdtype, max_m, l2_bytes, cpu, gen, copies=same)
    points = []  # every (shape, kind, M, config) tried
    refs = {}  # (shape, kind, M) -> {"cublas_us" or "scaled_mm_us", and their "_error"}
    for name, d in data.items():
        for kind in args.kinds:
            for M in args.ms:
                ref = d.reference(kind, M)
                r = refs.setdefault((name, kind, M), {})
                reference_timings(args, d, kind, M, r, sg, cpu)
                for cfg in candidates(sg, M, d.N, d.K, kind, d.act, num_sms, args.quick, args.extra_fma):
                    if time.time() > args.deadline:
                        points.append({"shape": name, "kind": kind, "M": M, "N": d.N, "K": d.K, "config": str(cfg),
                                       "default": False, "error": "skipped: --budget-s reached"})
                        continue
                    p = {"shape": name, "kind": kind, "M": M, "N": d.N, "K": d.K, "config": str(cfg),
                         "default": cfg == sg.default_config(M, d.N, d.K, FP8 if kind == "fp8" else torch.bfloat16,
                                                             d.act, num_sms)}
                    t_verify = time.perf_counter()
                    p["error"] = verify_ours(sg, d, kind, M, cfg, ref)
                    if p["error"] is None and cpu:  # interpreter wall time: exercises the reports, measures nothing
                        p["us"] = 1e6 * (time.perf_counter() - t_verify)
                        p["TBps"] = d.bytes[kind] / (p["us"] * 1e-6) / 1e12
                    elif p["error"] is None:
                        try:
                            ms = graph_ms(ours_chain(sg, d, kind, M, cfg), args.reps)
                            p["us"] = 1e3 * ms / len(d.copies[kind])
                            p["TBps"] = d.bytes[kind] / (p["us"] * 1e-6) / 1e12
                        except Exception as e:
                            p["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    points.append(p)
        d._refs.clear()  # the LM head's float32 references are large
        print(f"  {name}: {sum(1 for p in points if p['shape'] == name)} configs tried "
              f"({time.time() - args.deadline + args.budget_s:.0f} s)", flush=True)
    return data, points, refs


def verify_ours(sg, d, kind, M, cfg, ref):
    w, s = d.copies[kind][0]
    out = torch.full((M, d.N), float("nan"), dtype=d.x.dtype, device=d.x.device)
    saved = sg._new_workspace
    sg._new_workspace = lambda split, m, n, device: torch.full((split, m, n), float("nan"), device=device)
    try:
        sg.skinny_linear(d.x[:M], w, s, d.bias, act=d.act, config=cfg, out=out)
        err = check(out, ref)
        if err is None and int(sg._lock_buffer(d.x.device).abs().sum()):
            err = "split-K counters not reset to zero"
        return err
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        sg._new_workspace = saved


def ours_chain(sg, d, kind, M, cfg):
    x, copies, b, act = d.x[:M], d.copies[kind], d.bias, d.act

    def fn():
        for w, s in copies:
            sg.skinny_linear(x, w, s, b, act=act, config=cfg)
    return fn


def reference_timings(args, d, kind, M, r, sg, cpu):
    """cuBLAS bf16 (F.linear) and torch._scaled_mm fp8 on the same chain of copies; checked before timed."""
    from pagedbatch.engine.models.fused_ops import silu_and_mul

    x = d.x[:M]
    pre = silu_and_mul if d.act else (lambda t: t)
    if kind == "bf16":
        copies = d.copies["bf16"]
        t = time.perf_counter()
        err = check(F.linear(pre(x), copies[0][0], d.bias), d.reference("bf16", M))
        r["cublas_error"] = err
        if err is None and cpu:
            r["cublas_us"] = 1e6 * (time.perf_counter() - t)
        elif err is None:
            def fn():
                for w, _ in copies:
                    F.linear(pre(x), w, d.bias)
            try:
                r["cublas_us"] = 1e3 * graph_ms(fn, args.reps) / len(copies)
            except Exception as e:
                r["cublas_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    elif not cpu and hasattr(torch, "_scaled_mm"):
        copies = d.copies["fp8"]
        try:
            xq, xs = quantize_rows(pre(x))
            xs = xs[:, None].contiguous()
            scales = [s.view(1, -1).contiguous() for _, s in copies]

            def mm(w, s):
                y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)
                return y + d.bias if d.bias is not None else y
            w0, s0 = copies[0]
            want = (xq.float() * xs) @ (w0.float() * s0[:, None]).T
            r["scaled_mm_error"] = err = check(mm(w0, scales[0]), want + (d.bias.float() if d.bias is not None else 0))
            if err is None:
                def fn():
                    for (w, _), s in zip(copies, scales):
                        mm(w, s)
                r["scaled_mm_us"] = 1e3 * graph_ms(fn, args.reps) / len(copies)
        except Exception as e:
            r["scaled_mm_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def best_configs(points, sg):
    """(shape, kind, M) -> the fastest verified point."""
    best = {}
    for p in points:
        if p.get("us") is None:
            continue
        k = (p["shape"], p["kind"], p["M"])
        if k not in best or p["us"] < best[k]["us"]:
            best[k] = p
    return best


# ---------------------------------------------------------------- the whole chain

def run_chains(args, sg, data, best, layers, cpu):
    """Every layer's 4 matmuls + the LM head, for each variant; ms per chain (None if a piece is missing)."""
    from pagedbatch.engine.models.fused_ops import silu_and_mul

    order = ["qkv", "o", "gate_up", "down"]
    rows = []
    for M in args.ms:
        def cfg_of(shape, kind, use_best):
            if not use_best:
                return None
            p = best.get((shape, kind, M))
            if p is None:
                raise LookupError(f"no verified config for {shape} {kind} M={M}")
            return sg.SkinnyConfig.parse(p["config"])

        def ours(kind, use_best, silu=None):
            """silu: None (plain down), "fused" (down+silu prologue), "kernel" (silu_and_mul, then down)."""
            calls = []
            for i in range(layers):
                for name in order:
                    fused = name == "down" and silu == "fused"
                    d = data["down+silu" if fused else name]
                    w, s = d.copies[kind][i % len(d.copies[kind])]
                    cfg = cfg_of(d.name, kind, use_best)
                    x = data["down+silu"].x[:M] if (name == "down" and silu) else d.x[:M]
                    pre = silu == "kernel" and name == "down"
                    calls.append((x, w, s, d.bias, "silu_mul" if fused else None, cfg, pre))
            head = data["lm_head"]
            calls.append((head.x[:M], head.copies["bf16"][0][0], None, None, None, cfg_of("lm_head", "bf16", use_best),
                          False))

            def fn():
                for x, w, s, b, act, cfg, pre in calls:
                    sg.skinny_linear(silu_and_mul(x) if pre else x, w, s, b, act=act, config=cfg)
            return fn

        def cublas():
            calls = [(data[n].x[:M], data[n].copies["bf16"][i % len(data[n].copies["bf16"])][0], data[n].bias)
                     for i in range(layers) for n in order]
            calls.append((data["lm_head"].x[:M], data["lm_head"].copies["bf16"][0][0], None))

            def fn():
                for x, w, b in calls:
                    F.linear(x, w, b)
            return fn

        def scaled_mm():
            calls = []
            for i in range(layers):
                for n in order:
                    d = data[n]
                    w, s = d.copies["fp8"][i % len(d.copies["fp8"])]
                    xq, xs = quantize_rows(d.x[:M])
                    calls.append((xq, xs[:, None].contiguous(), w, s.view(1, -1).contiguous(), d.bias))
            head = data["lm_head"]

            def fn():
                for xq, xs, w, s, b in calls:
                    y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)
                    if b is not None:
                        y + b
                F.linear(head.x[:M], head.copies["bf16"][0][0])
            return fn

        variants = [("cuBLAS bf16", "bf16", cublas), ("ours bf16", "bf16", lambda: ours("bf16", True)),
                    ("ours bf16 default", "bf16", lambda: ours("bf16", False))]
        if "fp8" in args.kinds:
            variants += [("ours fp8", "fp8", lambda: ours("fp8", True)),
                         ("ours fp8 default", "fp8", lambda: ours("fp8", False))]
            if not cpu and hasattr(torch, "_scaled_mm"):
                variants.append(("_scaled_mm fp8", "fp8", scaled_mm))
        for kind in args.kinds:
            variants += [(f"ours {kind} +silu_and_mul", kind, lambda k=kind: ours(k, True, "kernel")),
                         (f"ours {kind} silu fused", kind, lambda k=kind: ours(k, True, "fused"))]
        row = {"M": M}
        for label, kind, make in variants:
            if kind not in args.kinds:
                continue
            try:
                fn = make()
                if cpu:  # the CPU run checks that every variant runs; its wall time measures nothing
                    t = time.perf_counter()
                    fn()
                    row[label] = 1e3 * (time.perf_counter() - t)
                else:
                    row[label] = graph_ms(fn, args.chain_reps)
            except Exception as e:
                row[label] = None
                row[label + " error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"  chain M={M} done", flush=True)
    return rows


def chain_bytes(data, layers):
    order = ["qkv", "o", "gate_up", "down"]
    head = data["lm_head"].bytes["bf16"]
    return {k: layers * sum(data[n].bytes[k] for n in order) + head for k in ("bf16", "fp8")}


# ---------------------------------------------------------------- reports

def print_shape_tables(args, data, points, refs, best):
    for kind in args.kinds:
        for M in args.ms:
            print(f"\n[{kind} weights, M={M}] per call, L2-cold (us; TB/s of weight bytes)")
            print(f"{'shape':<10}{'N':>7}{'K':>7}{'MB':>8}{'cuBLAS bf16':>13}{'_scaled_mm':>12}{'ours best':>11}"
                  f"{'TB/s':>6}{'x cuBLAS':>9}{'default':>9}  best config")
            for name, d in data.items():
                r = refs.get((name, kind, M), {})
                cub = refs.get((name, "bf16", M), {}).get("cublas_us")
                p = best.get((name, kind, M))
                dflt = next((q for q in points if q["shape"] == name and q["kind"] == kind and q["M"] == M
                             and q["default"] and q.get("us")), None)

                def f(v, w=11, prec=1):
                    return f"{v:>{w}.{prec}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
                print(f"{name:<10}{d.N:>7}{d.K:>7}{d.bytes[kind] / 1e6:>8.1f}{f(cub, 13)}{f(r.get('scaled_mm_us'), 12)}"
                      f"{f(p and p['us'])}{f(p and p['TBps'], 6, 2)}{f(p and cub and cub / p['us'], 9, 2)}"
                      f"{f(dflt and dflt['us'], 9)}  {p['config'] if p else '-'}")


def print_chain_table(rows, nbytes, peak):
    labels = [k for k in rows[0] if k != "M" and not k.endswith(" error")] if rows else []
    print(f"\nwhole chain: every layer's qkv, o, gate_up, down + the LM head (bf16 in every variant), CUDA graph, "
          f"L2-cold.\nFloors at {peak} TB/s: bf16 weights {nbytes['bf16'] / peak / 1e9:.3f} ms, "
          f"fp8 weights {nbytes['fp8'] / peak / 1e9:.3f} ms. Columns:")
    for i, lab in enumerate(labels):
        print(f"  [{i}] {lab}")
    for title, cell in (("ms per chain", lambda r, lab, v, nb: f"{v:.3f}"),
                        ("TB/s of weight bytes", lambda r, lab, v, nb: f"{nb / v / 1e9:.2f}"),
                        ("speed-up vs cuBLAS bf16",
                         lambda r, lab, v, nb: f"{r['cuBLAS bf16'] / v:.2f}x" if r.get("cuBLAS bf16") else "-")):
        print(f"{title}:\n{'M':>4}" + "".join(f"{'[' + str(i) + ']':>10}" for i in range(len(labels))))
        for r in rows:
            line = f"{r['M']:>4}"
            for lab in labels:
                v = r.get(lab)
                line += f"{cell(r, lab, v, nbytes['fp8' if 'fp8' in lab else 'bf16']) if v else '-':>10}"
            print(line)
    for r in rows:
        for k, v in r.items():
            if k.endswith(" error"):
                print(f"  M={r['M']} {k}: {v}")


def paste_block(args, sg, best, refs, chains, info) -> str:
    lines = [f"# ---- bench/skinny_gemm.py {info['date'][:10]} {info['device']}, torch {info['torch']}, "
             f"triton {info['triton']}, {info['model']} tp{args.tp}: paste into skinny_gemm.py ----"]
    max_m = {}
    for kind in args.kinds:
        ok = 0
        for r in sorted(chains, key=lambda r: r["M"]):
            ours = r.get(f"ours {kind}")
            rivals = [r.get("cuBLAS bf16")] + ([r.get("_scaled_mm fp8")] if kind == "fp8" else [])
            rivals = [v for v in rivals if v]
            if ours and rivals and ours <= min(rivals):
                ok = r["M"]
            else:
                break
        max_m[kind] = ok
    rivals = "cuBLAS bf16" + (" (fp8: and _scaled_mm)" if "fp8" in args.kinds else "")
    lines.append(f"MAX_M = {json.dumps({k: max_m.get(k, sg.MAX_M[k]) for k in sg.MAX_M})}"
                 f"  # largest swept M up to which ours beat {rivals} on the whole chain")
    lines.append("TUNED: dict[tuple, str] = {")
    order = ["qkv", "o", "gate_up", "down", "down+silu", "lm_head"]
    for (shape, kind, M), p in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], order.index(kv[0][0]))):
        key = (sg.m_bucket(M), p["N"], p["K"], kind) + (("silu_mul",) if shape == "down+silu" else ())
        cub = refs.get((shape, "bf16", M), {}).get("cublas_us")
        vs = f", {cub / p['us']:.2f}x cuBLAS bf16" if cub else ""
        lines.append(f"    {key!r}: {p['config']!r},  # {shape}: {p['us']:.1f} us, {p['TBps']:.2f} TB/s{vs}")
    lines.append("}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model-config", default="qwen2.5-7b.json", help="a file in configs/models/")
    ap.add_argument("--tp", type=int, default=1, help="time one tensor-parallel rank's shard of each matmul")
    ap.add_argument("--ms", default=None, help="batch sizes M (default 1,2,4,8,16,64; --quick 1,4,16)")
    ap.add_argument("--kinds", default="bf16,fp8", help="weight kinds: bf16, fp8")
    ap.add_argument("--shapes", default=None, help="only these shapes (qkv,o,gate_up,down,down+silu,lm_head); the "
                                                   "chain needs all but down+silu")
    ap.add_argument("--layers", type=int, default=0, help="layers in the chain (0: the model's)")
    ap.add_argument("--quick", action="store_true", help="3 fma + 3 tensor-core tiles, at most 2 split counts")
    ap.add_argument("--extra-fma", default="", help="more fma tiles, 'block_n:K bytes:warps:stages[:unroll]' "
                                                     "comma-separated (e.g. 4:512:4:4,8:512:4:4:2), tried besides "
                                                     "FMA_TILES")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--chain-reps", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="HBM bandwidth for the floor column (H200: 4.8)")
    ap.add_argument("--plan", action="store_true", help="print how many configs and compiles; run nothing")
    ap.add_argument("--budget-s", type=float, default=420, help="stop trying configs after this many seconds "
                                                                "(the rest are reported as skipped); chains still run")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from pagedbatch.engine.models import skinny_gemm as sg

    args.ms = [int(m) for m in (args.ms or ("1,16" if cpu else "1,4,16" if args.quick else "1,2,4,8,16,64"))
               .split(",")]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.extra_fma = [tuple(int(v) for v in t.split(":")) for t in args.extra_fma.split(",") if t]
    dev = torch.device(args.device)
    shapes, layers = model_shapes(args.model_config, args.tp)
    layers = args.layers or (2 if cpu else layers)
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    if cpu and not args.plan:
        shapes = tiny_shapes(shapes)
    num_sms = sg._num_sms(dev.index or 0) if dev.type == "cuda" else 132
    l2_bytes = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 60 << 20) if not cpu else 0

    specs = {}
    n_points = 0
    for name, (N, K, b, act) in shapes.items():
        for kind in args.kinds:
            for M in args.ms:
                for cfg in candidates(sg, M, N, K, kind, act, num_sms, args.quick, args.extra_fma):
                    n_points += 1
                    specs.setdefault(compile_key(sg, cfg, kind, K, b, act), (str(cfg), kind, N, K, M, b, act))
    print(f"{args.model_config} tp{args.tp}: {len(shapes)} shapes x {args.kinds} x M {args.ms}: {n_points} configs, "
          f"{len(specs)} kernel variants to compile", flush=True)
    if args.plan:
        return 0
    info = {"device": torch.cuda.get_device_name(dev) if not cpu else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "model": args.model_config,
            "tp": args.tp, "layers": layers, "num_sms": num_sms, "l2_bytes": l2_bytes, "quick": args.quick,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python bench/skinny_gemm.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(info, flush=True)
    t0 = time.time()
    args.deadline = t0 + args.budget_s
    compile_errors = {} if cpu else precompile(list(specs.values()), args.jobs)
    xdtype = torch.float32 if cpu else torch.bfloat16  # the interpreter's bf16 arithmetic is wrong
    data, points, refs = run_sweep(args, sg, dev, xdtype, shapes, num_sms, l2_bytes, cpu)
    best = best_configs(points, sg)
    chains = []
    if all(n in data for n in ("qkv", "o", "gate_up", "down", "down+silu", "lm_head")):
        chains = run_chains(args, sg, data, best, layers, cpu)
    bad = [p for p in points if p["error"]]
    print(f"\n{len(points)} configs checked, {len(bad)} wrong or failed; sweep took {time.time() - t0:.0f} s")
    for p in bad:
        print(f"  WRONG/FAILED {p['shape']} {p['kind']} M={p['M']} [{p['config']}]: {p['error']}")
    for (name, kind, M), r in refs.items():
        for k, v in r.items():
            if k.endswith("_error") and v:
                print(f"  reference {k[:-6]} {name} {kind} M={M}: {v}")
    if cpu:
        print("\nCPU interpreter run: the times below are wall times of single eager calls, NOT measurements")
    print_shape_tables(args, data, points, refs, best)
    if chains:
        print_chain_table(chains, chain_bytes(data, layers), args.peak_tbps)
    paste = paste_block(args, sg, best, refs, chains, info)
    print("\n" + paste)
    os.makedirs(args.results_dir, exist_ok=True)
    name = (f"skinny_gemm-{info['date'][:10]}-{info['device'].split(' (')[0].replace(' ', '_')}"
            f"-{args.model_config.replace('.json', '')}-tp{args.tp}{'-' + args.tag if args.tag else ''}.json")
    with open(os.path.join(args.results_dir, name), "w") as fh:
        json.dump({**info, "shapes": {k: list(v) for k, v in shapes.items()}, "points": points,
                   "references": [{"shape": n, "kind": k, "M": m, **r} for (n, k, m), r in refs.items()],
                   "best": [{**p} for p in best.values()], "chains": chains,
                   "compile_errors": [list(k) + [v] for k, v in compile_errors.items()], "paste": paste}, fh, indent=1)
    print(f"wrote {os.path.join(args.results_dir, name)}")
    return 1 if cpu and bad else 0


if __name__ == "__main__":
    sys.exit(main())
