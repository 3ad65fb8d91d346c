"""The interface all attention backends implement.

The contract is that of flash-attn's ``flash_attn_with_kvcache``: the backend
receives q/k/v for the new tokens *before* rotary, applies rotary at each
token's position, writes k/v into the paged cache, and attends over the cached
context through the block table. Doing all three in one call lets a fast
backend fuse them; the torch reference does them one after the other.

A cache in float8 (``kv_quant.py``) comes with the layer's ``kv_scale``
([k_scale, v_scale] float32 on the device): writes store x / scale, reads
use stored * scale. A cache in the model's dtype ignores it.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from .metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        cos_sin: torch.Tensor,  # [max_positions, head_dim] float32: cos half, then sin half
        meta: AttentionMetadata,
        scale: float,
        kv_scale: Optional[torch.Tensor] = None,  # [2] float32: the fp8 cache's K and V scales
    ) -> torch.Tensor:  # [T, num_heads, head_dim], dtype of q
        ...
