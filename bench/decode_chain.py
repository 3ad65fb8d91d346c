"""A single-stream decode step's norms and matmuls in a CUDA graph, with and without programmatic dependent launch.

    python bench/decode_chain.py                                  # Qwen2.5-7B, bf16 and fp8 weights (~20 s, H200)
    python bench/decode_chain.py --model-config llama3-8b.json --kinds bf16 --rounds 3
    python bench/decode_chain.py --l2-prefetch 0,8192,32768             # skinny_gemm.L2_PREFETCH_BYTES values
    python bench/decode_chain.py --fuse-norm off,on --rounds 2          # norms as kernels / inside the GEMMs

Per layer, as the engine runs one row: RMSNorm, qkv, o, RMSNorm (residual folded in), gate_up, down with the
fused silu·mul, all our Triton kernels (``fused_ops.rms_norm``, ``skinny_gemm.skinny_linear``; with
``--fuse-norm on`` the norms run inside the qkv and gate_up kernels, ``skinny_norm_linear``; attention is left
out), ``--layers`` layers captured in one CUDA graph; the median of ``--reps`` replays. The weights (13 GB in
bf16) are far larger than L2, so every replay streams them from HBM. Each kind is timed with PDL off and on
(``engine/pdl.py``'s switch) in alternation, ``--rounds`` times. The roofline is the weights' bytes at the copy
bandwidth measured in the same run. Needs a CUDA GPU (PDL: compute capability 9.0+). JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from skinny_gemm import graph_ms, model_shapes  # noqa: E402
from throughput import measure_ceilings  # noqa: E402

MATMULS = ("qkv", "o", "gate_up", "down")  # a layer's, in chain order


def build(shapes: dict, layers: int, kind: str, dev, gen) -> tuple[list, list, int]:
    """(per-layer {name: (weight, scale)}, norm weights, weight bytes) with random weights of one kind."""
    from pagedbatch.engine.models.fp8 import quantize_rows

    hidden = shapes["o"][0]
    weights, nbytes = [], 0
    for _ in range(layers):
        layer = {}
        for name in MATMULS:
            n, k = shapes[name][:2]
            w = (torch.randn(n, k, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
            layer[name] = quantize_rows(w) if kind == "fp8" else (w, None)
            nbytes += layer[name][0].numel() * layer[name][0].element_size()
        weights.append(layer)
    norms = [(1 + 0.02 * torch.randn(hidden, generator=gen, device=dev)).to(torch.bfloat16)
             for _ in range(2 * layers)]
    return weights, norms, nbytes


def chain(x, weights, norms, q_size: int, fuse_norm: bool = False, cfg: dict = {}):
    """``cfg``: skinny configs by matmul name ("qkv", "o", "gate_up", "down"); the others use their defaults."""
    from pagedbatch.engine.models import skinny_gemm as sg
    from pagedbatch.engine.models.fused_ops import rms_norm

    c = {k: cfg.get(k) for k in MATMULS}
    res = x  # values do not matter here: the kernels and bytes are the engine's
    for i, layer in enumerate(weights):
        if fuse_norm:  # linear.norm_linear's route: the norm inside the qkv / gate_up kernel
            qkv, res = sg.skinny_norm_linear(x, sg.RMSNormIn(res, norms[2 * i], 1e-6), *layer["qkv"],
                                             config=c["qkv"])
            x = sg.skinny_linear(qkv[:, :q_size], *layer["o"], config=c["o"])  # stands in for the attention output
            gu, res = sg.skinny_norm_linear(x, sg.RMSNormIn(res, norms[2 * i + 1], 1e-6), *layer["gate_up"],
                                            config=c["gate_up"])
            x = sg.skinny_linear(gu, *layer["down"], act="silu_mul", config=c["down"])
            continue
        h, res = rms_norm(x, norms[2 * i], 1e-6, res)
        qkv = sg.skinny_linear(h, *layer["qkv"], config=c["qkv"])
        x = sg.skinny_linear(qkv[:, :q_size], *layer["o"], config=c["o"])
        h, res = rms_norm(x, norms[2 * i + 1], 1e-6, res)
        x = sg.skinny_linear(sg.skinny_linear(h, *layer["gate_up"], config=c["gate_up"]), *layer["down"],
                             act="silu_mul", config=c["down"])
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="qwen2.5-7b.json", help="a file in configs/models/")
    ap.add_argument("--kinds", default="bf16,fp8", help="weight kinds: bf16, fp8")
    ap.add_argument("--layers", type=int, default=0, help="layers in the chain (0: the model's)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1, help="PDL off/on alternations per kind")
    ap.add_argument("--l2-prefetch", default=None, metavar="BYTES[,BYTES...]",
                    help="skinny_gemm.L2_PREFETCH_BYTES values (default: the engine's), each timed with PDL on; "
                         "PDL off runs with the first")
    ap.add_argument("--fuse-norm", default=None, metavar="off,on",
                    help="the norms as kernels of their own (off) and/or inside the qkv / gate_up GEMMs (on, "
                         "skinny_norm_linear), each timed with PDL on; PDL off runs with the first (default: as "
                         "the engine runs each weight kind, linear.fuses_norm: bf16 on, fp8 off)")
    ap.add_argument("--configs", default="", metavar="NAME=CONFIG[;NAME=CONFIG...]",
                    help="also time the chain with one matmul's skinny config replaced (NAME: qkv, o, gate_up, "
                         "down, or all four; e.g. 'qkv=fma bm1 bn4 bk512 sk1 w4 st4'), each against the defaults in "
                         "the same round, PDL on, with the first --fuse-norm mode")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_chain: needs a CUDA GPU")
    from pagedbatch.engine import pdl
    from pagedbatch.engine.models import skinny_gemm as sg

    engine_budget = sg.L2_PREFETCH_BYTES
    budgets = [int(b) for b in args.l2_prefetch.split(",")] if args.l2_prefetch else [engine_budget]
    from pagedbatch.engine.models import linear

    variants = [tuple(v.strip().split("=", 1)) for v in args.configs.split(";") if v.strip()]
    for v in variants:
        if len(v) != 2 or v[0] not in (*MATMULS, "all"):
            ap.error(f"--configs: expected NAME=CONFIG with NAME one of qkv, o, gate_up, down, all, "
                     f"got {'='.join(v)!r}")
        sg.SkinnyConfig.parse(v[1])
    given = [{"off": False, "on": True}[f] for f in args.fuse_norm.split(",")] if args.fuse_norm else None

    dev = torch.device("cuda")
    if not pdl.enabled(dev):
        raise SystemExit("decode_chain: PDL is not available here (compute capability 9.0+ and Triton with "
                         "grid dependency control)")
    ceilings = measure_ceilings(dev)
    shapes, model_layers = model_shapes(args.model_config, 1)
    layers = args.layers or model_layers
    hidden = shapes["o"][0]
    q_size = shapes["o"][1]
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, hidden, generator=gen, device=dev).to(torch.bfloat16)
    rows = []
    for kind in args.kinds.split(","):
        weights, norms, nbytes = build(shapes, layers, kind, dev, gen)
        roof_us = nbytes / ceilings["copy_bw"] * 1e6
        fusions = given or [linear.fuses_norm(kind == "fp8")]  # default: as the engine runs these weights
        for r in range(args.rounds):
            for b in budgets:
                sg.L2_PREFETCH_BYTES = b
                for fuse in fusions:
                    t = {}
                    for on in (False, True) if (b, fuse) == (budgets[0], fusions[0]) else (True,):
                        pdl.USE_PDL = on
                        t[on] = graph_ms(lambda: chain(x, weights, norms, q_size, fuse), args.reps) * 1e3
                    pdl.USE_PDL = True
                    rows.append({"kind": kind, "round": r, "l2_prefetch": b, "fuse_norm": fuse,
                                 "pdl_off_us": t.get(False), "pdl_on_us": t[True], "roofline_us": roof_us,
                                 "weight_bytes": nbytes})
            sg.L2_PREFETCH_BYTES = engine_budget
            for name, text in variants:
                names = MATMULS if name == "all" else (name,)
                cfgs = {n: sg.SkinnyConfig.parse(text) for n in names}
                us = graph_ms(lambda: chain(x, weights, norms, q_size, fusions[0], cfgs), args.reps) * 1e3
                rows.append({"kind": kind, "round": r, "l2_prefetch": engine_budget, "fuse_norm": fusions[0],
                             "config": f"{name}={text}", "pdl_off_us": None, "pdl_on_us": us, "roofline_us": roof_us,
                             "weight_bytes": nbytes})
        del weights, norms
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev)
    print(f"\n{args.model_config}, {layers} layers at one row (norms + qkv, o, gate_up, down+silu; no attention), "
          f"CUDA graph, {name}, copy {ceilings['copy_bw'] / 1e12:.2f} TB/s")
    print(f"{'weights':<8}{'round':>6}{'L2 pf B':>9}{'norms':>7}{'PDL off us':>12}{'PDL on us':>11}"
          f"{'roofline us':>13}{'SOL% on':>9}")
    for r in rows:
        off = f"{r['pdl_off_us']:>12.0f}" if r["pdl_off_us"] else f"{'-':>12}"
        print(f"{r['kind']:<8}{r['round']:>6}{r['l2_prefetch']:>9}{'fused' if r['fuse_norm'] else 'own':>7}{off}"
              f"{r['pdl_on_us']:>11.0f}"
              f"{r['roofline_us']:>13.0f}{100 * r['roofline_us'] / r['pdl_on_us']:>8.1f}%  {r.get('config', '')}")
    os.makedirs(args.results_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = os.path.join(args.results_dir, f"decode-chain-{date}-{name.replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
                   "command": "python bench/decode_chain.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "model_config": args.model_config, "layers": layers, "ceilings": ceilings, "rows": rows}, f,
                  indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
