"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step of a 7B model is ~6-8 ms of GPU work but ~1 ms of kernel
launches when run eagerly, so decode runs as a replayed graph. Inputs live
in static buffers sized for the largest bucket; a batch of B rows runs the
smallest bucket >= B, and the padding rows write their K/V into a scratch
block that no sequence owns and attend to it alone.

The attention backend must size its launches from host ints that are fixed
per bucket: the graphs are captured with ``max_seq_len = max_model_len``.

Tensor parallel: the model's NCCL all-reduces are captured into the graphs
(NCCL kernels are capturable), so every rank captures the same buckets in
the same order and later replays the same bucket for the same step.
"""
from __future__ import annotations

import torch

from .attention.metadata import AttentionMetadata


def graph_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 1, 16)) + ([max_batch] if max_batch % 16 else [])


class DecodeGraphs:
    def __init__(self, model, kv_caches, cos_sin, backend, *, max_batch: int, max_blocks_per_seq: int,
                 max_model_len: int, scratch_block: int, block_size: int, hidden_size: int, dtype, device,
                 synchronize=torch.cuda.synchronize, capture_error_mode: str = "global"):
        self.model, self.kv_caches, self.cos_sin, self.backend = model, kv_caches, cos_sin, backend
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.max_batch
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.out = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._synchronize = synchronize  # the runner's: with TP it fails instead of hanging on a dead worker
        self._capture_error_mode = capture_error_mode

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:b], slot_mapping=self.slots[:b], query_start_loc=self.qsl[: b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], num_seqs=b, num_tokens=b,
            max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        reserve = getattr(self.backend, "reserve", None)
        if reserve is not None:  # split-K workspace allocated before any graph points at it
            a = self.model.local_args  # this rank's heads
            kv_dtype = self.kv_caches[0][0].dtype
            for b in self.buckets:
                reserve(b, a.num_heads, a.num_kv_heads, a.head_dim, self.max_model_len, self.ids.device, kv_dtype)
        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its memory pool
            meta = self._meta(b)
            for _ in range(2):  # warm-up: compile kernels, settle allocations
                self.out[:b] = self.model(self.ids[:b], self.kv_caches, self.cos_sin, meta, self.backend)
            self._synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode=self._capture_error_mode):
                self.out[:b] = self.model(self.ids[:b], self.kv_caches, self.cos_sin, meta, self.backend)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b] = g
        self._synchronize()

    def bucket_for(self, b: int) -> int:
        for size in self.buckets:
            if size >= b:
                return size
        raise ValueError(f"batch {b} exceeds the largest graph bucket {self.max_batch}")

    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = meta.num_seqs
        size = self.bucket_for(b)
        w = meta.block_tables.shape[1]
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(meta.positions)
        self.slots[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :w].copy_(meta.block_tables)
        if size > b:  # padding rows: attend to the scratch block only
            self.positions[b:size].zero_()
            self.slots[b:size].fill_(self.scratch_slot)
            self.seq_lens[b:size].fill_(1)
            self.block_tables[b:size, 0].fill_(self.scratch_block)
        self.graphs[size].replay()
        return self.out[:b]
