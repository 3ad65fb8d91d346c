"""Why one-row fp8 weights stream slower than bf16 in the skinny GEMM: a probe for one GPU.

    python bench/skinny_stream_probe.py                               # gate_up and down of Qwen2.5-7B (~1 min)
    python bench/skinny_stream_probe.py --shapes qkv,o --tiles 8:512:4:4,16:512:4:4,8:1024:4:3
    python bench/skinny_stream_probe.py --device cpu                  # correctness only: the interpreter, tiny shapes

At one row the fma kind reads Qwen2.5-7B's gate_up at 4.14 TB/s with bf16 weights and 3.55 TB/s with fp8 (H200,
2026-12-03 sweep) from the same tile bytes (8 weight rows x 512 B), the same number of programs and the same
load pipeline. Two readings fit: the fp8 loop's work per byte (131 sm_90 instructions a 4 KB tile against bf16's
85: e4m3 -> fp16 -> fp32 conversions and twice the FMAs; the dotH kind has half of them and was not faster), or
the programs' structure (an fp8 program's K range is half the bytes of a bf16 one; the persistent kernel that
removed that was not faster either). This times, L2-cold (R weight copies), kernels with the engine's tile, loop
and pipelining that change only the work done per weight:

  engine  ``skinny_linear`` as the engine calls it (its default config for the shape)
  full    the fma loop written here: fp32 multiply-add of each converted weight (checks the probe against engine)
  half    e4m3 -> fp16, multiply-add in fp16 (half the math of full, imprecise: a probe only)
  load    the loads alone: each 32-bit word of the weight and of x XORed into an int32 tile (no math)

If ``load`` streams fp8 as fast as bf16 and ``full`` does not, the math bounds the kernel and fewer instructions a
weight are worth finding; if ``load`` is as slow as ``full``, the structure is what to change (tile, programs,
loads in flight), not the math. Prints TB/s (weight bytes / time) per shape, kind, tile and mode against the copy
bandwidth measured in the same run; JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

MODES = ("engine", "full", "half", "load")


@functools.lru_cache(maxsize=None)
def probe_kernel():
    """The probe's kernel, defined at the first call: the CPU run sets TRITON_INTERPRET before triton is imported."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(X, W, S, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
        """One output column tile of ``x @ W.T`` for one row of x, walking K in [BLOCK_N, BLOCK_K] tiles as the
        engine's fma kind does. MODE 0: full, 1: half, 2: load (W and X are then int32 views, K and BLOCK_K
        count 32-bit words)."""
        pid = tl.program_id(0)
        rn = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
        rk = tl.arange(0, BLOCK_K)
        w_rows = W + rn.to(tl.int64)[:, None] * K
        if MODE == 0:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        elif MODE == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for it in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
            offs = it * BLOCK_K + rk
            w = tl.load(w_rows + offs[None, :])
            a = tl.load(X + offs[None, :])
            if MODE == 0:
                acc += w.to(tl.float32) * a.to(tl.float32)
            elif MODE == 1:
                acc += w.to(tl.float16) * (a.to(tl.float32) * 0.00390625).to(tl.float16)
            else:
                acc ^= w ^ a
        if MODE == 2:
            tl.store(Y + rn, tl.xor_sum(acc, 1))
        else:
            y = tl.sum(acc.to(tl.float32), 1)
            if S is not None:
                y = y * tl.load(S + rn)
            tl.store(Y + rn, y.to(Y.dtype.element_ty))

    return _probe_kernel


def parse_tiles(text: str) -> list[tuple[int, int, int, int]]:
    """'8:512:4:4,...' -> [(block_n, tile bytes per row, warps, stages), ...]."""
    out = []
    for part in filter(None, text.split(",")):
        try:
            bn, kb, w, s = (int(v) for v in part.split(":"))
        except ValueError:
            raise SystemExit(f"--tiles: expected block_n:row_bytes:warps:stages, got {part!r}")
        out.append((bn, kb, w, s))
    return out


def launch(mode: str, x: torch.Tensor, w: torch.Tensor, scale, y: torch.Tensor, tile):
    """One probe call: x [K] bf16, w [N, K] (fp8 or bf16), y [N] (int32 for ``load``)."""
    bn, row_bytes, warps, stages = tile
    N, K = w.shape
    grid = (-(-N // bn),)
    if mode == "load":
        # Words, not elements: x is read at the weight tile's word offsets, as many words a tile as one weight
        # row (with fp8 weights half the real kernel's x bytes; x comes from L2 in both).
        wi = w.view(torch.int32)
        kw = wi.shape[1]  # at most x's K / 2 words: bf16 x has at least as many bytes as a weight row
        return probe_kernel()[grid](x.view(torch.int32)[:kw], wi, None, y, N, kw, BLOCK_N=bn, BLOCK_K=row_bytes // 4,
                                    MODE=2, NUM_STAGES=stages, num_warps=warps, num_stages=stages)
    bk = row_bytes // w.element_size()
    return probe_kernel()[grid](x, w, scale, y, N, K, BLOCK_N=bn, BLOCK_K=bk, MODE=0 if mode == "full" else 1,
                                NUM_STAGES=stages, num_warps=warps, num_stages=stages)


def run(args) -> list[dict]:
    from pagedbatch.engine.models import skinny_gemm as sg
    from pagedbatch.engine.models.fp8 import quantize_rows
    from skinny_gemm import graph_ms, model_shapes

    cpu = args.device == "cpu"
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    if cpu:
        shapes = {"tiny": (48, 512)}
        l2 = 0
    else:
        full, _ = model_shapes(args.model_config, 1)
        shapes = {name: (n, k) for name, (n, k, *_rest) in ((s, full[s]) for s in args.shapes.split(","))}
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    tiles = parse_tiles(args.tiles)
    rows = []
    for name, (N, K) in shapes.items():
        for kind in args.kinds.split(","):
            itemsize = 1 if kind == "fp8" else 2
            copies = 1 if cpu else max(2, min(64, -(-4 * l2 // (N * K * itemsize))))
            ws = []
            for _ in range(copies):
                wf = torch.randn(N, K, device=dev, generator=gen) * 0.02
                ws.append(quantize_rows(wf) if kind == "fp8" else (wf.to(torch.bfloat16), None))
            x = torch.randn(K, device=dev, generator=gen).to(torch.bfloat16)
            w0, s0 = ws[0]
            ref = (x.float()[None, :] @ (w0.float() * (s0[:, None] if s0 is not None else 1)).T)[0]
            for tile in tiles:
                if (K * itemsize) % tile[1]:
                    raise SystemExit(f"--tiles {':'.join(map(str, tile))}: {name}'s rows ({K * itemsize} bytes of "
                                     f"{kind}) are not a whole number of {tile[1]}-byte tiles (the probe has no masks)")
                for mode in args.modes.split(","):
                    if mode == "engine" and tile != tiles[0]:
                        continue  # the engine's own config: once per shape and kind
                    y = torch.empty(N, dtype=torch.int32 if mode == "load" else torch.bfloat16, device=dev)

                    def call(i=0, mode=mode, tile=tile, y=y):
                        w, s = ws[i]
                        if mode == "engine":
                            return sg.skinny_linear(x[None, :], w, s, out=y[None, :])
                        return launch(mode, x, w, s, y, tile)

                    kernel = call()
                    err = None
                    if mode in ("engine", "full"):
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        if not err <= 2e-2:
                            raise SystemExit(f"{name} {kind} {mode} {tile}: error {err:.2e} of max |ref|")
                    row = dict(shape=name, N=N, K=K, kind=kind, mode=mode,
                               tile="engine default" if mode == "engine" else ":".join(map(str, tile)), err=err)
                    if not cpu:
                        # Registers decide how many programs share an SM (the load mode's kernel needs fewer).
                        row["registers"] = getattr(kernel, "n_regs", None) if mode != "engine" else None
                        ms = graph_ms(lambda: [call(i) for i in range(copies)], args.reps) / copies
                        row.update(us=ms * 1e3, tbps=N * K * itemsize / (ms * 1e-3) / 1e12)
                    rows.append(row)
                    print(f"{name:8s} {kind:5s} {row['tile']:14s} {mode:7s} "
                          + (f"{row['us']:8.1f} us {row['tbps']:5.2f} TB/s" if not cpu else "ok")
                          + (f"  {row['registers']} registers" if row.get("registers") else "")
                          + (f"  err {err:.1e}" if err is not None else ""), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model-config", default="qwen2.5-7b.json", help="a file in configs/models/")
    ap.add_argument("--shapes", default="gate_up,down", help="of qkv, o, gate_up, down")
    ap.add_argument("--kinds", default="fp8,bf16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tiles", default="8:512:4:4,16:512:4:4",
                    help="block_n:row_bytes:warps:stages, comma-separated (the engine's one-row tile: 8:512:4:4)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("skinny_stream_probe: needs a CUDA GPU (or --device cpu for correctness only)")
    bad = set(args.modes.split(",")) - set(MODES)
    if bad:
        raise SystemExit(f"--modes: unknown {sorted(bad)} (of {', '.join(MODES)})")
    rows = run(args)
    if args.device == "cuda":
        from throughput import measure_ceilings

        ceil = measure_ceilings(torch.device("cuda"))
        name = torch.cuda.get_device_name().replace(" ", "_")
        day = datetime.date.today().isoformat()
        os.makedirs(args.results_dir, exist_ok=True)
        path = os.path.join(args.results_dir, f"skinny_stream_probe-{day}-{name}{'-' + args.tag if args.tag else ''}.json")
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=day, ceilings=ceil, rows=rows), f, indent=1)
        print(f"copy bandwidth this run: {ceil}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
