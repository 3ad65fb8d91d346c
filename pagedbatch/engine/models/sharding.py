"""How one tensor-parallel rank's slice of the model is cut (pure arithmetic, no processes).

Megatron-style: q/k/v and gate/up are column-parallel (each rank its
attention heads and its slice of the intermediate size), o_proj and
down_proj row-parallel (each rank the matching input columns, partial sums
all-reduced), the embedding and the LM head vocab-parallel (each rank a
contiguous range of token rows). Norms, q/k norms (per head, the same for
every head) are replicated. Biases follow their layer's output rows: q/k/v
and gate/up biases are split with them, o_proj and down_proj biases (whole
output rows) are replicated and added once, after the all-reduce.

KV heads: with at least as many KV heads as ranks, each rank holds
``num_kv_heads / tp`` of them; with fewer, each KV head is replicated on the
``tp / num_kv_heads`` consecutive ranks whose query heads read it.

The intermediate size and the vocabulary need not divide: every rank gets
``ceil(n / tp)`` rows and the last rank's excess rows are zero. A zero
gate/up row gives ``silu(0) * 0 = 0`` into a zero down_proj column, and a
zero LM-head row gives a logit that is cut off before sampling, so padding
changes no result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .config import ModelArgs


@dataclass(frozen=True)
class TPShard:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1


@dataclass(frozen=True)
class Part:
    """Where one checkpoint tensor (or one part of a fused parameter) lands on this rank.

    Rows (or columns, ``dim=1``) ``src_start : src_start + count`` of the
    full tensor fill ``count`` rows of the parameter from ``dst_start``; the
    parameter's rows up to ``dst_start + dst_len`` past them are padding
    (zero). ``dim=None``: the whole tensor, replicated.
    """

    dim: Optional[int]
    full_len: int
    src_start: int
    count: int
    dst_start: int
    dst_len: int


def check_tensor_parallel(args: ModelArgs, tp: int) -> None:
    """ValueError (naming tensor_parallel_size) when the model cannot be split ``tp`` ways."""
    if tp == 1:
        return
    if args.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's {args.num_heads} attention heads")
    kv = args.num_kv_heads
    if kv >= tp and kv % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's {kv} KV heads "
                         f"(or be a multiple of them: KV heads are then replicated)")
    if kv < tp and tp % kv:
        raise ValueError(f"tensor_parallel_size {tp} must be a multiple of the model's {kv} KV heads when larger "
                         f"than their number (each KV head is replicated on tensor_parallel_size / {kv} ranks)")


def split(n: int, shard: TPShard) -> tuple[int, int, int]:
    """(start, count, local length) of rank ``shard.rank``'s slice of ``n`` rows, padded to ``ceil(n / size)``."""
    local = -(-n // shard.size)
    start = min(n, shard.rank * local)
    return start, min(local, n - start), local


def kv_heads(args: ModelArgs, shard: TPShard) -> tuple[int, int]:
    """(first KV head, KV heads held) on this rank."""
    kv, tp = args.num_kv_heads, shard.size
    if kv >= tp:
        return shard.rank * (kv // tp), kv // tp
    return shard.rank // (tp // kv), 1


def local_args(args: ModelArgs, shard: TPShard) -> ModelArgs:
    """The shape of this rank's slice: its heads, KV heads, intermediate rows and vocabulary rows (padded)."""
    if shard.size == 1:
        return args
    return dataclasses.replace(
        args, num_heads=args.num_heads // shard.size, num_kv_heads=kv_heads(args, shard)[1],
        intermediate_size=split(args.intermediate_size, shard)[2], vocab_size=split(args.vocab_size, shard)[2])


def vocab_range(args: ModelArgs, shard: TPShard) -> tuple[int, int]:
    """[start, end) of the token ids whose embedding and LM-head rows this rank holds."""
    start, count, _ = split(args.vocab_size, shard)
    return start, start + count


def param_parts(args: ModelArgs, shard: TPShard, name: str) -> list[Part]:
    """The parts of our parameter ``name`` (``layers.3.self_attn.qkv_proj_weight``, ``embed_tokens``, ...).

    Fused parameters have one part per checkpoint tensor (q, k, v; gate, up),
    in the order the loader numbers them.
    """
    hd, heads = args.head_dim, args.num_heads // shard.size
    if name.endswith(("qkv_proj_weight", "qkv_proj_bias")):
        kv_start, kv_count = kv_heads(args, shard)
        q = Part(0, args.num_heads * hd, shard.rank * heads * hd, heads * hd, 0, heads * hd)
        k = Part(0, args.num_kv_heads * hd, kv_start * hd, kv_count * hd, heads * hd, kv_count * hd)
        v = dataclasses.replace(k, dst_start=(heads + kv_count) * hd)
        return [q, k, v]
    if name.endswith(("gate_up_proj_weight", "gate_up_proj_bias")):
        start, count, local = split(args.intermediate_size, shard)
        gate = Part(0, args.intermediate_size, start, count, 0, local)
        return [gate, dataclasses.replace(gate, dst_start=local)]
    if name.endswith("o_proj_weight"):
        return [Part(1, args.num_heads * hd, shard.rank * heads * hd, heads * hd, 0, heads * hd)]
    if name.endswith("down_proj_weight"):
        start, count, local = split(args.intermediate_size, shard)
        return [Part(1, args.intermediate_size, start, count, 0, local)]
    if name in ("embed_tokens", "lm_head"):
        start, count, local = split(args.vocab_size, shard)
        return [Part(0, args.vocab_size, start, count, 0, local)]
    return [Part(None, 0, 0, 0, 0, 0)]
