"""The fp8 activation kernels of a decode step alone: SiLU·mul (+ quantize), RMSNorm (+ quantize), quantize; µs per call.

    python bench/silu_quant.py                              # W-nano's and W1's shapes, 33-512 rows
    python bench/silu_quant.py --max-blocks 2048,4096,8192  # the fused kernel's columns a pass
    python bench/silu_quant.py --device cpu                 # smoke test (Triton's interpreter, tiny shapes)

With fp8 weights on the ``_scaled_mm``/mid route the activation of each
linear is quantized per token: by the norm kernel (qkv, gate_up), by the
SiLU·mul kernel (down), and by a kernel of its own (o_proj). One program
per row finds the row's largest magnitude and then writes its e4m3 values,
so with few rows each program's latency is the kernel's. Per shape this
times, each replayed from a CUDA graph (the engine replays decode steps):

- ``silu``: the bf16 path's SiLU·mul (bf16 out, many programs per row);
- ``silu+quant``: that kernel, then ``fp8.quantize_per_token`` (unfused);
- ``fused@B``: ``_silu_and_mul_quant_kernel`` with ``fused_ops.SILU_QUANT_MAX_BLOCK = B``
  (a row of up to B columns read once and kept in registers; longer rows two passes);
- ``norm`` / ``norm+quant``: the RMSNorm with the residual add, unquantized and quantized;
- ``quant``: o_proj's input quantized alone (q heads x head_dim columns).

Calls follow each other on one stream as in the engine, PDL-launched where
the engine launches them so (``--no-pdl``: plain stream order).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pagedbatch is imported in main(): the CPU run must set TRITON_INTERPRET before anything imports triton.

# name: (hidden, intermediate, q heads x head_dim)
MODELS = {"wnano": (1024, 3072, 2048), "w1": (3584, 18944, 3584)}
TINY = {"tiny": (64, 96, 64)}


def cases(model: str, rows: list[int], dims: tuple[int, int, int], device, max_blocks: list[int]):
    """(case, kernel, fn) for every kernel at each row count; each fused width checked against the unfused bits."""
    from pagedbatch.engine.models import fused_ops
    from pagedbatch.engine.models.fp8 import quantize_per_token_triton as quantize_per_token

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, inter, qdim = dims
    g = torch.Generator(device="cpu").manual_seed(0)
    for M in rows:
        gate_up = (torch.randn(M, 2 * inter, generator=g) * 3).to(device, dtype)
        x, res = (torch.randn(M, hidden, generator=g).to(device, dtype) for _ in range(2))
        w = torch.ones(hidden, device=device, dtype=dtype)
        o = torch.randn(M, qdim, generator=g).to(device, dtype)
        yield f"{model} M={M}", "silu", lambda gu=gate_up: fused_ops._silu_and_mul_triton(gu)
        yield f"{model} M={M}", "silu+quant", lambda gu=gate_up: quantize_per_token(fused_ops._silu_and_mul_triton(gu))
        want_q, want_s = quantize_per_token(fused_ops._silu_and_mul_triton(gate_up))
        for b in max_blocks:
            def fused(gu=gate_up, b=b):
                fused_ops.SILU_QUANT_MAX_BLOCK = b
                return fused_ops._silu_and_mul_quant_triton(gu)
            got = fused()  # a kernel is timed only once it gives the unfused pair's bits
            if not (torch.equal(got.q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got.scale, want_s)):
                raise SystemExit(f"{model} M={M}: fused@{b} differs from silu+quant")
            yield f"{model} M={M}", f"fused@{b}", fused
        yield f"{model} M={M}", "norm", lambda x=x, r=res, w=w: fused_ops._rms_norm_triton(x, w, 1e-6, r)
        yield f"{model} M={M}", "norm+quant", lambda x=x, r=res, w=w: fused_ops._rms_norm_triton(x, w, 1e-6, r, True)
        yield f"{model} M={M}", "quant", lambda o=o: quantize_per_token(o)


def time_us(fn, device, calls: int) -> float:
    """µs per call: ``calls`` back-to-back calls captured in one CUDA graph, replayed (interpreter: one call)."""
    if device.type != "cuda":
        fn()
        return float("nan")
    from triton.testing import do_bench_cudagraph

    def many():
        for _ in range(calls):
            fn()

    many()  # compile outside the capture
    torch.cuda.synchronize()
    return 1e3 * do_bench_cudagraph(many, rep=200) / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="wnano,w1", help=f"of {sorted(MODELS)}")
    ap.add_argument("--rows", default="33,64,128,256,512")
    ap.add_argument("--max-blocks", default="2048,4096,8192", help="fused_ops.SILU_QUANT_MAX_BLOCK values")
    ap.add_argument("--calls", type=int, default=28, help="calls a graph (a layer each in a decode step)")
    ap.add_argument("--no-pdl", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; --device cpu runs the smoke test")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below
    from pagedbatch.engine import pdl
    from pagedbatch.engine.models import fused_ops

    if args.no_pdl:
        pdl.USE_PDL = False
    if device.type == "cpu":
        models, rows = TINY, [3]
    else:
        models = {m: MODELS[m] for m in args.models.split(",")}
        rows = [int(r) for r in args.rows.split(",")]
    blocks = [int(b) for b in args.max_blocks.split(",")]
    default_block = fused_ops.SILU_QUANT_MAX_BLOCK
    results: dict[str, dict[str, float]] = {}
    try:
        for model, dims in models.items():
            for case, kernel, fn in cases(model, rows, dims, device, blocks):
                results.setdefault(case, {})[kernel] = time_us(fn, device, args.calls)
    finally:
        fused_ops.SILU_QUANT_MAX_BLOCK = default_block
    kernels = list(next(iter(results.values())))
    print(f"{'µs per call':<16}" + "".join(f"{k:>12}" for k in kernels))
    for case, row in results.items():
        print(f"{case:<16}" + "".join(f"{row[k]:>12.2f}" for k in kernels))
    print(f"fused@{','.join(map(str, blocks))}: the same e4m3 bits and scales as silu+quant in every case")
    if device.type == "cuda":
        print(f"({torch.cuda.get_device_name(device)}, torch {torch.__version__}, PDL {'off' if args.no_pdl else 'on'}, "
              f"{args.calls} calls a graph; fused_ops.SILU_QUANT_MAX_BLOCK = {default_block})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "pdl": not args.no_pdl, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
