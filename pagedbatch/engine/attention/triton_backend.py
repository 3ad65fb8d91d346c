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
"""
from __future__ import annotations

import torch

from .metadata import AttentionMetadata
from .triton_kernels import (
    choose_num_splits,
    decode_workspace_shape,
    paged_decode,
    paged_prefill,
    rotary_cache_write,
)


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

    ``num_splits`` forces the decode split count (tests, tuning); otherwise it is
    chosen from (num_seqs, num_kv_heads, max_seq_len) and the SM count.
    """

    name = "triton"

    def __init__(
        self,
        *,
        num_splits: int | None = None,
        max_splits: int = 16,
        decode_block_n: int = 64,
        prefill_block_m: int = 64,
        prefill_block_n: int = 64,
        num_sms: int | None = None,
    ) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits
        self.max_splits = max_splits
        self.decode_block_n = decode_block_n
        self.prefill_block_m = prefill_block_m
        self.prefill_block_n = prefill_block_n
        self._num_sms = num_sms
        self._workspace = _SplitWorkspace()

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:
                self._num_sms = 132  # H100: keeps CPU (interpreter) choices those of the target
        return self._num_sms

    def decode_num_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int, device) -> int:
        if self.num_splits is not None:
            return self.num_splits
        return choose_num_splits(num_seqs, num_kv_heads, max_seq_len, self.decode_block_n,
                                 self._sm_count(torch.device(device)), self.max_splits)

    def reserve(self, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                device) -> None:
        """Allocate the decode workspace for the largest batch up front (before graph capture)."""
        splits = self.decode_num_splits(num_seqs, num_kv_heads, max_seq_len, device)
        if splits > 1:
            self._workspace.get(num_seqs, num_heads, splits, head_dim, device)

    def forward(self, q, k, v, k_cache, v_cache, cos_sin, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        T, H, D = q.shape
        q_rot = rotary_cache_write(q, k, v, k_cache, v_cache, cos_sin, meta.positions, meta.slot_mapping)
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        if meta.is_decode_only:
            kvh = k_cache.shape[2]
            splits = self.decode_num_splits(meta.num_seqs, kvh, meta.max_seq_len, q.device)
            ws = self._workspace.get(meta.num_seqs, H, splits, D, q.device) if splits > 1 else None
            return paged_decode(q_rot, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, splits,
                                out=out, workspace=ws, block_n=self.decode_block_n)
        return paged_prefill(q_rot, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             meta.num_seqs, meta.max_query_len, scale, out=out,
                             block_m=self.prefill_block_m, block_n=self.prefill_block_n)

