"""The batch description every attention backend receives.

One step of the engine runs a flat batch of T query tokens that belong to B
sequences: some sequences contribute a prefill chunk (many tokens), others a
single decode token. The tokens of sequence i are
``query_start_loc[i]:query_start_loc[i+1]`` of the flat batch, and they are
the *last* tokens of that sequence: after this step's cache write the
sequence holds ``seq_lens[i]`` tokens in its KV blocks, so its queries sit
at positions ``seq_lens[i] - q_len_i .. seq_lens[i] - 1`` and attend
causally to every cached key up to their own position.

KV-cache layout, per layer (the flash-attn paged layout)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

Token ``p`` of sequence ``i`` lives in block ``block_tables[i, p // block_size]``
at offset ``p % block_size``; ``slot_mapping[t]`` is the flat slot
(block * block_size + offset) that query token ``t`` writes its K/V into.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64, position of each query token
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot each token writes
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, tokens in cache after this step's write
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    # Host-side facts, known when the batch is built, so kernels can size
    # their grids without reading device tensors back.
    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
