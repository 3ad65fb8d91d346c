"""Prefill attention alone: our Triton backend against torch's own fused varlen kernel, one GPU.

    python bench/prefill_attention.py                     # Qwen2.5-7B attention shape, 4 x 2,048 tokens
    python bench/prefill_attention.py --seqs 16 --len 512
    python bench/prefill_attention.py --kv-cache-dtype fp8 --v-layout keys-last   # an fp8 cache, V as K
    python bench/prefill_attention.py --heads 16 --kv-heads 8 --seqs 15 --lens 100,1024 \
        --tiles "bm64 bn64 w4 st2,bm128 bn64 w8 st2,bm128 bn128 w8 st3"   # W-nano's shape, tiles swept

Ours is timed doing all it does in the engine (rotary, the paged cache
write, attention read back through the block table); torch's
``varlen_attn`` (flash attention over contiguous K/V, no cache) is timed on
the attention alone, with K/V heads repeated when the installed torch has no
GQA argument — a lower bound for a path that would still need rotary and the
cache write. Prints milliseconds per layer call and the attention TFLOP/s.
With ``--kv-cache-dtype fp8`` ours writes and reads an fp8 cache (scales
1.0), its V stored as the engine stores it (``--v-layout``: the engine's
default, or either layout). ``--lens LO,HI`` draws each sequence's length
uniformly from LO..HI (seed 0; W-nano's prompts are 100..1,024), and
``--tiles`` times our attention once per prefill tile (``PrefillTile``
strings, comma-separated; the engine's default first unless listed).
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
import time

import torch

if not torch.cuda.is_available():  # a CPU smoke run (tests): kernels in Triton's interpreter, before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedbatch.engine.attention import kv_quant  # noqa: E402
from pagedbatch.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pagedbatch.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedbatch.engine.attention.prefill_tile import DEFAULT_PREFILL_TILE, PrefillTile  # noqa: E402
from pagedbatch.engine.attention.triton_kernels import rotary_cache_write  # noqa: E402


def timed(fn, reps=20) -> float:
    """Milliseconds per call (CUDA events; on the CPU one call's wall time)."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--v-layout", choices=["keys-last", "key-contiguous"], default=None,
                    help="an fp8 cache's V blocks (default: the engine's, kv_quant.FP8_V_KEY_CONTIGUOUS)")
    ap.add_argument("--lens", default=None, metavar="LO,HI",
                    help="random sequence lengths in LO..HI (seed 0) instead of --len for all")
    ap.add_argument("--tiles", default=None,
                    help="comma-separated prefill tiles to time our attention with, e.g. 'bm64 bn64 w4 st2,bm128 "
                         "bn128 w8 st3' (default: the engine's tile only)")
    args = ap.parse_args(argv)
    tiles = [PrefillTile.parse(t) for t in args.tiles.split(",")] if args.tiles else []
    if DEFAULT_PREFILL_TILE not in tiles:
        tiles.insert(0, DEFAULT_PREFILL_TILE)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, H, KVH, D, BS = args.seqs, args.heads, args.kv_heads, args.head_dim, args.block_size
    if args.lens:
        lo, hi = map(int, args.lens.split(","))
        rng = random.Random(0)
        lens = [rng.randint(lo, hi) for _ in range(B)]
    else:
        lens = [args.len] * B
    T, L = sum(lens), max(lens)
    q = torch.randn(T, H, D, device=dev, dtype=dt)
    k = torch.randn(T, KVH, D, device=dev, dtype=dt)
    v = torch.randn(T, KVH, D, device=dev, dtype=dt)
    per_seq = [-(-n // BS) for n in lens]
    nb = sum(per_seq)
    fp8 = args.kv_cache_dtype == "fp8"
    key_contiguous = fp8 and (kv_quant.FP8_V_KEY_CONTIGUOUS if args.v_layout is None
                              else args.v_layout == "key-contiguous")
    cache = torch.zeros(2, 1, nb, BS, KVH, D, device=dev, dtype=kv_quant.FP8_KV_DTYPE if fp8 else dt)
    (k_cache, v_cache), = kv_quant.layer_caches(cache, key_contiguous)
    kv_scale = torch.ones(2, device=dev) if fp8 else None
    ids = torch.randperm(nb, device=dev, dtype=torch.int32)
    table = torch.zeros(B, max(per_seq), device=dev, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = ids[used:used + n]
        used += n
    seq_of = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(lens, device=dev))
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])
    slots = table.long()[seq_of, pos // BS] * BS + pos % BS
    cu = torch.tensor([0] + lens, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, query_start_loc=cu,
                             seq_lens=torch.tensor(lens, device=dev, dtype=torch.int32), block_tables=table,
                             num_seqs=B, num_tokens=T, max_query_len=L, max_seq_len=L)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    f = torch.arange(L + 1, device=dev).float()[:, None] * inv[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    scale = D**-0.5
    backend = TritonAttentionBackend()
    flops = sum(4 * H * D * n * (n + 1) / 2 for n in lens)  # causal QK^T and PV

    rows = [("pagedbatch triton (rotary + cache write + paged attention)",
             timed(lambda: backend.forward(q, k, v, k_cache, v_cache, cos_sin, meta, scale, kv_scale)))]
    q_rot = rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions, meta.slot_mapping,
                               kv_scale=kv_scale)
    rows += [("  of which rotary + cache write",
              timed(lambda: rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions,
                                               meta.slot_mapping, kv_scale=kv_scale))),
             ("  of which paged attention", timed(lambda: backend.attend(q_rot, k_cache, v_cache, meta, scale,
                                                                        kv_scale)))]
    want = backend.attend(q_rot, k_cache, v_cache, meta, scale, kv_scale).float()
    for tile in tiles[1:]:
        other = TritonAttentionBackend(prefill_tile=tile)
        got = other.attend(q_rot, k_cache, v_cache, meta, scale, kv_scale).float()
        err = (got - want).abs().max().item()  # a tile that computes something else must not win the sweep
        rows.append((f"  paged attention, tile {tile} (max |diff| {err:.1e})",
                     timed(lambda: other.attend(q_rot, k_cache, v_cache, meta, scale, kv_scale))))
    rows[2] = (f"  of which paged attention, tile {DEFAULT_PREFILL_TILE} (the default)", rows[2][1])
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw = {"scale": scale} if "scale" in params else {}
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        if "enable_gqa" in params:
            kk, vv, kw["enable_gqa"] = k, v, True
        else:
            kk, vv = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        rows.append(("torch varlen_attn (attention only, contiguous K/V)",
                     timed(lambda: varlen_attn(q, kk, vv, cu, cu, L, L, **kw))))
    except Exception as e:  # not in every torch build; the comparison is optional
        rows.append((f"torch varlen_attn unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}",
                     float("nan")))
    if len(set(lens)) == 1:  # a dense batch needs equal lengths
        sdpa_q = q.view(B, L, H, D).transpose(1, 2)
        sdpa_k = k.view(B, L, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
        sdpa_v = v.view(B, L, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
        rows.append(("torch SDPA causal (attention only, dense batch)",
                     timed(lambda: torch.nn.functional.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v,
                                                                                    is_causal=True))))
    shape = f"{B} x {L}" if len(set(lens)) == 1 else f"{B} sequences of {min(lens)}..{L} ({T})"
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}: {shape} tokens, {H} q / {KVH} kv heads, "
          f"head_dim {D}, block {BS}; our cache {'fp8' if fp8 else str(dt).replace('torch.', '')}"
          f"{(', V key-contiguous' if key_contiguous else ', V as K') if fp8 else ''}")
    for name, ms in rows:
        print(f"  {name:<78} {ms:8.3f} ms  {flops / ms / 1e9:7.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
