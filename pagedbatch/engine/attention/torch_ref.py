"""Plain-torch attention backend: the executable specification.

Runs on any device. Fast backends are tested against it. It is written for
clarity first, but stays vectorised (no Python loop over sequences) because it
is also the CPU engine's production path.

An fp8 cache (see ``kv_quant.py``) is written from the float32 rotated keys
(no rounding to the model dtype in between, as the fused Triton kernel
does) and read back dequantized with the layer's scales.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kv_quant import checked_scale, dequantize, quantize
from .metadata import AttentionMetadata


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (GPT-NeoX / Hugging Face Llama) rotary. x: [T, H, D]; cos, sin: [T, D/2] float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary_for_positions(cos_sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cs = cos_sin.index_select(0, positions)
    half = cs.shape[-1] // 2
    return cs[:, :half], cs[:, half:]


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scale: Optional[torch.Tensor] = None,
) -> None:
    """k/v into the cache slots; an fp8 cache stores ``quantize(x, scale)`` (``kv_scale``: [k_scale, v_scale])."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    kv_scale = checked_scale(k_cache, kv_scale)
    if kv_scale is None:
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    # Bytes moved through uint8 views: index_copy_ has no float8 kernel on the CPU.
    for x, cache, s in ((k, k_cache, kv_scale[0]), (v, v_cache, kv_scale[1])):
        cache.view(torch.uint8).view(-1, num_kv_heads, head_dim).index_copy_(
            0, slot_mapping, quantize(x, s).view(torch.uint8))


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of already-rotated queries over the paged cache (which already holds this step's keys)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    device = q.device
    B = meta.num_seqs
    max_q = meta.max_query_len
    max_kv = meta.max_seq_len

    q_start = meta.query_start_loc.long()
    q_lens = q_start[1:] - q_start[:-1]  # [B]
    seq_lens = meta.seq_lens.long()

    # Scatter the flat queries into a padded [B, max_q] grid.
    seq_of_token = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=num_tokens)
    row_of_token = torch.arange(num_tokens, device=device) - q_start[seq_of_token]
    q_pad = q.new_zeros(B, max_q, num_heads, head_dim)
    q_pad[seq_of_token, row_of_token] = q

    # Gather each sequence's keys/values through its block table.
    kv_pos = torch.arange(max_kv, device=device)
    blocks = meta.block_tables.long()[:, kv_pos // block_size]  # [B, max_kv]
    slots = blocks * block_size + (kv_pos % block_size)[None, :]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    kv_scale = checked_scale(k_cache, kv_scale)
    if kv_scale is None:
        k_seq = k_flat[slots].to(q.dtype)  # [B, max_kv, kvh, d]
        v_seq = v_flat[slots].to(q.dtype)
    else:
        k_seq = dequantize(k_flat[slots], kv_scale[0], q.dtype)
        v_seq = dequantize(v_flat[slots], kv_scale[1], q.dtype)

    # Query row r of sequence i sits at position seq_len - q_len + r: causal is lower-right aligned.
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, max_q]
    allowed = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < seq_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),
        k_seq.transpose(1, 2),
        v_seq.transpose(1, 2),
        attn_mask=allowed[:, None, :, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [B, max_q, h, d]
    return out[seq_of_token, row_of_token]


def rotate_and_cache(q, k, v, k_cache, v_cache, cos_sin, meta: AttentionMetadata,
                     kv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary on q and k at each token's position, then k/v into the paged cache; returns rotated q."""
    cos, sin = rotary_for_positions(cos_sin, meta.positions)
    k_rot = apply_rotary(k.float() if checked_scale(k_cache, kv_scale) is not None else k, cos, sin)
    write_kv_cache(k_rot, v, k_cache, v_cache, meta.slot_mapping, kv_scale)
    return apply_rotary(q, cos, sin)


class TorchAttentionBackend:
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, cos_sin, meta: AttentionMetadata, scale: float,
                kv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = rotate_and_cache(q, k, v, k_cache, v_cache, cos_sin, meta, kv_scale)
        return paged_attention_reference(q, k_cache, v_cache, meta, scale, kv_scale)
