"""The fused rotary + KV-cache write kernel alone, per cache layout: µs per call.

    python bench/cache_write.py                 # decode and prefill shapes of W-nano and W1
    python bench/cache_write.py --v-tiles 0,32,64 --cases wnano-prefill   # prefill's V by token tiles
    python bench/cache_write.py --device cpu    # smoke test (Triton's interpreter, tiny shapes)

An fp8 cache with key-contiguous V (the engine's layout) writes each token's V
as one byte in each of head_dim rows of its block; this measures what that
costs against V stored like K, and against a bf16 cache. Slots are those of a
real step: decode writes one token into each sequence's own block, prefill
writes whole runs of blocks. ``--v-tiles`` adds, for the key-contiguous
layout, V written by tiles of that many consecutive tokens (``v_tile``, what
steps with prefill use when ``triton_backend.PREFILL_V_TILE`` is set).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedbatch.engine.attention import kv_quant  # noqa: E402
from pagedbatch.engine.attention.triton_kernels import rotary_cache_write  # noqa: E402

# name: (tokens, q heads, kv heads, head_dim, Qwen3's q/k norms, decode)
CASES = {
    "wnano-decode": (256, 16, 8, 128, True, True),
    "w1-decode": (512, 28, 4, 128, False, True),
    "wnano-prefill": (8192, 16, 8, 128, True, False),
}
TINY = {"tiny-decode": (8, 4, 2, 32, True, True), "tiny-prefill": (40, 4, 2, 32, False, False)}


def make(case, layout: str, device, block_size: int = 16, v_tile: int = 0):
    T, H, KVH, D, norm, decode = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fp8 = layout != "bf16"
    blocks = (T if decode else T // block_size + 1) + 1
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(T, n, D, generator=g).to(device, dtype) for n in (H, KVH, KVH))
    cache = torch.zeros(2, 1, blocks, block_size, KVH, D, dtype=kv_quant.FP8_KV_DTYPE if fp8 else dtype,
                        device=device)
    (k_cache, v_cache), = kv_quant.layer_caches(cache, layout == "fp8-key-contiguous")
    if decode:  # one token per sequence, each in its own block, at scattered offsets
        pos = torch.randint(16, 2048, (T,), generator=g)
        slots = torch.arange(T) * block_size + pos % block_size
    else:
        pos = torch.arange(T)
        slots = torch.arange(T)
    cos_sin = torch.randn(4096, D, generator=g).to(device)
    norms = (torch.ones(D, device=device, dtype=dtype), torch.ones(D, device=device, dtype=dtype), 1e-6) if norm else None
    scale = torch.tensor([0.05, 0.05], device=device) if fp8 else None
    args = (q, k, v, k_cache, v_cache, cos_sin, pos.to(device), slots.to(device))
    fn = lambda: rotary_cache_write(*args, kv_scale=scale, qk_norm=norms, v_tile=v_tile)  # noqa: E731
    return fn, T * (H + 2 * KVH) * D


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=None, help="comma-separated names (default: all for the device)")
    ap.add_argument("--layouts", default="bf16,fp8-keys-last,fp8-key-contiguous")
    ap.add_argument("--block-size", type=int, default=64, help="KV block size (the engine's GPU default: 64)")
    ap.add_argument("--v-tiles", default="", help="comma-separated v_tile values to add as columns for the "
                                                   "key-contiguous layout (e.g. 32,64)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases = CASES if device.type == "cuda" else TINY
    names = args.cases.split(",") if args.cases else list(cases)
    columns = [(layout, 0) for layout in args.layouts.split(",")]
    columns += [("fp8-key-contiguous", int(t)) for t in args.v_tiles.split(",") if t and int(t)]
    heads = [f"{lay}/t{t}" if t else lay for lay, t in columns]
    print(f"block size {args.block_size}")
    print(f"{'case':>14} " + " ".join(f"{x:>20}" for x in heads) + "   (us per call)")
    for name in names:
        row = []
        for layout, tile in columns:
            fn, _ = make(cases[name], layout, device, args.block_size, tile)
            if device.type == "cuda":
                # Replayed from a CUDA graph: a decode-sized call is shorter than its Python launch.
                from triton.testing import do_bench_cudagraph
                fn()
                row.append(1e3 * do_bench_cudagraph(fn, rep=200))
            else:
                fn()
                row.append(float("nan"))
        print(f"{name:>14} " + " ".join(f"{x:20.2f}" for x in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
