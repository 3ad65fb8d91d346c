"""Triton attention backend: fused rotary + cache write, then paged decode or prefill.

Same contract as ``TorchAttentionBackend``. The hot path reads no device
tensor back: grids come from the host ints in ``AttentionMetadata``.

CUDA graphs (decode): for a fixed ``num_seqs`` and block-table width the
launches have fixed shapes. ``max_seq_len`` is used by decode only to pick
the number of KV splits, and the kernel reads each sequence's true length on
the device, so a runner capturing a graph bucket should build its metadata
with ``max_seq_len`` set to the bucket's bound (e.g. block-table width times
block size); the split count is then constant for the bucket. The split-K
workspace is allocated once and only grows; a replaced buffer is kept alive
because graphs captured earlier still point at it. Calling ``reserve`` with
the largest bucket before capturing avoids growth altogether.

Decode runs one of the ``triton_decode.DECODE_CONFIGS`` (the default for the
cache's dtype unless ``decode_config`` names one).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .metadata import AttentionMetadata
from .triton_decode import DecodeConfig, decode_workspace_shape, paged_decode, resolve_decode_config
from .prefill_tile import DEFAULT_PREFILL_TILE, PrefillTile
from .triton_kernels import paged_prefill, rotary_cache_write

# Steps with prefill write a key-contiguous (fp8) V cache by tiles of this many consecutive tokens
# (``rotary_cache_write``'s ``v_tile``; 0: token by token, as decode always does, one token a sequence). The
# same bytes. Token by token, each of a token's V bytes lands in a memory sector of its own; by tiles a warp
# stores adjacent tokens' bytes. H100, 2026-12-06 (bench/cache_write.py, W-nano's 8,192-token prefill step at
# 64-token blocks): 46 us a layer at 16 (47-48 at 32 and 64) against 127 token by token and 50 for a bf16 cache;
# W-nano with an fp8 cache, tiles 0 and 16 alternated in one process: its steps with prefill 0.35-0.37 s
# against 0.38 (bench/profile_steps.py --runs-v-tiles 0,16).
PREFILL_V_TILE = 16


class _SplitWorkspace:
    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []

    def get(self, num_seqs: int, num_heads: int, num_splits: int, head_dim: int, device):
        so, sl = decode_workspace_shape(num_seqs, num_heads, num_splits, head_dim)
        n_o = num_seqs * num_heads * num_splits * head_dim
        need = n_o + num_seqs * num_heads * num_splits
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        buf = self._buf
        if buf is None or buf.numel() < need or buf.device != device:
            if buf is not None:
                self._retired.append(buf)
            buf = self._buf = torch.empty(need, dtype=torch.float32, device=device)
        return buf[:n_o].view(so), buf[n_o:need].view(sl)


class TritonAttentionBackend:
    """Paged attention in Triton kernels.

    ``num_splits`` forces the decode split count (tests, tuning); otherwise the
    decode config's policy chooses it from (num_seqs, num_kv_heads, max_seq_len)
    and the SM count. ``decode_config``: a ``DecodeConfig`` or a name in
    ``DECODE_CONFIGS`` (None: the default for the cache's dtype);
    ``decode_block_n`` overrides its keys per iteration (both tile kinds).
    ``prefill_tile``: a ``PrefillTile`` or its string form (None: ``DEFAULT_PREFILL_TILE``);
    ``prefill_block_m`` / ``prefill_block_n`` override its rows and keys (tests: small tiles).
    """

    name = "triton"
    fuses_qk_norm = True  # forward() takes Qwen3's q/k norms and applies them inside the rotary kernel
    attends_written_cache = True  # attend() takes q rotated elsewhere over a cache holding this step's k, v

    def __init__(
        self,
        *,
        num_splits: Optional[int] = None,
        max_splits: Optional[int] = None,
        decode_config: Union[str, DecodeConfig, None] = None,
        decode_block_n: Optional[int] = None,
        prefill_tile: Union[str, PrefillTile, None] = None,
        prefill_block_m: Optional[int] = None,
        prefill_block_n: Optional[int] = None,
        num_sms: Optional[int] = None,
    ) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits
        self._decode_config = decode_config
        overrides = {}
        if max_splits is not None:
            overrides["max_splits"] = max_splits
        if decode_block_n is not None:
            overrides.update(block_n=decode_block_n, lanes_block_n=decode_block_n)
        self._decode_overrides = overrides
        self._decode_configs: dict[torch.dtype, DecodeConfig] = {}  # by cache dtype, resolved once
        self.decode_config(torch.bfloat16)  # an unknown name or bad override fails here, not mid-run
        tile = PrefillTile.parse(prefill_tile) if prefill_tile is not None else DEFAULT_PREFILL_TILE
        if prefill_block_m is not None or prefill_block_n is not None:
            tile = dataclasses.replace(tile, block_m=prefill_block_m or tile.block_m,
                                       block_n=prefill_block_n or tile.block_n)
        self.prefill_tile = tile
        self._num_sms = num_sms
        self._workspace = _SplitWorkspace()

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:
                self._num_sms = 132  # H100: keeps CPU (interpreter) choices those of the target
        return self._num_sms

    def decode_config(self, kv_dtype: torch.dtype = torch.bfloat16) -> DecodeConfig:
        cfg = self._decode_configs.get(kv_dtype)
        if cfg is None:
            cfg = resolve_decode_config(self._decode_config, kv_dtype)
            if self._decode_overrides:
                cfg = dataclasses.replace(cfg, **self._decode_overrides)
            self._decode_configs[kv_dtype] = cfg
        return cfg

    def decode_num_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int, device, group: int = 1,
                          kv_dtype: torch.dtype = torch.bfloat16) -> int:
        if self.num_splits is not None:
            return self.num_splits
        return self.decode_config(kv_dtype).num_splits(num_seqs, num_kv_heads, group, max_seq_len,
                                                       self._sm_count(torch.device(device)))

    def reserve(self, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                device, kv_dtype: torch.dtype = torch.bfloat16) -> None:
        """Allocate the decode workspace for the largest batch up front (before graph capture)."""
        splits = self.decode_num_splits(num_seqs, num_kv_heads, max_seq_len, device, num_heads // num_kv_heads,
                                        kv_dtype)
        if splits > 1:
            self._workspace.get(num_seqs, num_heads, splits, head_dim, device)

    def forward(self, q, k, v, k_cache, v_cache, cos_sin, meta: AttentionMetadata, scale: float,
                kv_scale: Optional[torch.Tensor] = None, qk_norm=None) -> torch.Tensor:
        """``qk_norm``: (q_norm weight, k_norm weight, eps) to apply to q and k before rotary (Qwen3)."""
        q_rot = rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions, meta.slot_mapping,
                                   kv_scale=kv_scale, qk_norm=qk_norm,
                                   v_tile=0 if meta.is_decode_only else PREFILL_V_TILE)
        return self.attend(q_rot, k_cache, v_cache, meta, scale, kv_scale)

    def attend(self, q_rot, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               kv_scale: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of rotated queries over a cache that already holds this step's keys (``forward``'s second half)."""
        T, H, D = q_rot.shape
        if out is None:
            out = torch.empty((T, H, D), dtype=q_rot.dtype, device=q_rot.device)
        if meta.is_decode_only:
            kvh = k_cache.shape[2]
            cfg = self.decode_config(k_cache.dtype)
            splits = self.num_splits or cfg.num_splits(meta.num_seqs, kvh, H // kvh, meta.max_seq_len,
                                                       self._sm_count(q_rot.device))
            ws = self._workspace.get(meta.num_seqs, H, splits, D, q_rot.device) if splits > 1 else None
            return paged_decode(q_rot, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, splits,
                                out=out, workspace=ws, config=cfg, kv_scale=kv_scale)
        return paged_prefill(q_rot, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             meta.num_seqs, meta.max_query_len, scale, out=out,
                             block_m=self.prefill_tile.block_m, block_n=self.prefill_tile.block_n,
                             num_warps=self.prefill_tile.num_warps, num_stages=self.prefill_tile.num_stages,
                             kv_scale=kv_scale)
