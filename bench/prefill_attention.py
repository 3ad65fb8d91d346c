"""Prefill attention alone: our Triton backend against torch's own fused varlen kernel, one GPU.

    python bench/prefill_attention.py                     # Qwen2.5-7B attention shape, 4 x 2,048 tokens
    python bench/prefill_attention.py --seqs 16 --len 512
    python bench/prefill_attention.py --kv-cache-dtype fp8 --v-layout keys-last   # an fp8 cache, V as K

Ours is timed doing all it does in the engine (rotary, the paged cache
write, attention read back through the block table); torch's
``varlen_attn`` (flash attention over contiguous K/V, no cache) is timed on
the attention alone, with K/V heads repeated when the installed torch has no
GQA argument — a lower bound for a path that would still need rotary and the
cache write. Prints milliseconds per layer call and the attention TFLOP/s.
With ``--kv-cache-dtype fp8`` ours writes and reads an fp8 cache (scales
1.0), its V stored as the engine stores it (``--v-layout``: the engine's
default, or either layout).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedbatch.engine.attention import kv_quant  # noqa: E402
from pagedbatch.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pagedbatch.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedbatch.engine.attention.triton_kernels import rotary_cache_write  # noqa: E402


def timed(fn, reps=20) -> float:
    fn()
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
    args = ap.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, L, H, KVH, D, BS = args.seqs, args.len, args.heads, args.kv_heads, args.head_dim, args.block_size
    T = B * L
    q = torch.randn(T, H, D, device=dev, dtype=dt)
    k = torch.randn(T, KVH, D, device=dev, dtype=dt)
    v = torch.randn(T, KVH, D, device=dev, dtype=dt)
    nb = B * (L // BS)
    fp8 = args.kv_cache_dtype == "fp8"
    key_contiguous = fp8 and (kv_quant.FP8_V_KEY_CONTIGUOUS if args.v_layout is None
                              else args.v_layout == "key-contiguous")
    cache = torch.zeros(2, 1, nb, BS, KVH, D, device=dev, dtype=kv_quant.FP8_KV_DTYPE if fp8 else dt)
    (k_cache, v_cache), = kv_quant.layer_caches(cache, key_contiguous)
    kv_scale = torch.ones(2, device=dev) if fp8 else None
    table = torch.randperm(nb, device=dev, dtype=torch.int32).view(B, L // BS)
    pos = torch.arange(L, device=dev).repeat(B)
    slots = (table.long()[torch.arange(B, device=dev).repeat_interleave(L), pos // BS] * BS + pos % BS)
    cu = torch.arange(0, T + 1, L, device=dev, dtype=torch.int32)
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, query_start_loc=cu,
                             seq_lens=torch.full((B,), L, device=dev, dtype=torch.int32), block_tables=table,
                             num_seqs=B, num_tokens=T, max_query_len=L, max_seq_len=L)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    f = torch.arange(L + 1, device=dev).float()[:, None] * inv[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    scale = D**-0.5
    backend = TritonAttentionBackend()
    flops = 4 * H * D * B * L * (L + 1) / 2  # causal QK^T and PV

    rows = [("pagedbatch triton (rotary + cache write + paged attention)",
             timed(lambda: backend.forward(q, k, v, k_cache, v_cache, cos_sin, meta, scale, kv_scale)))]
    q_rot = rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions, meta.slot_mapping,
                               kv_scale=kv_scale)
    rows += [("  of which rotary + cache write",
              timed(lambda: rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions,
                                               meta.slot_mapping, kv_scale=kv_scale))),
             ("  of which paged attention", timed(lambda: backend.attend(q_rot, k_cache, v_cache, meta, scale,
                                                                        kv_scale)))]
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
        rows.append((f"torch varlen_attn unavailable: {type(e).__name__}: {e}", float("nan")))
    sdpa_q = q.view(B, L, H, D).transpose(1, 2)
    sdpa_k = k.view(B, L, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
    sdpa_v = v.view(B, L, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
    rows.append(("torch SDPA causal (attention only, padded batch)",
                 timed(lambda: torch.nn.functional.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v, is_causal=True))))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {B} x {L} tokens, {H} q / {KVH} kv heads, "
          f"head_dim {D}, block {BS}; our cache {'fp8' if fp8 else 'bf16'}"
          f"{(', V key-contiguous' if key_contiguous else ', V as K') if fp8 else ''}")
    for name, ms in rows:
        print(f"  {name:<62} {ms:8.3f} ms  {flops / ms / 1e9:7.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
