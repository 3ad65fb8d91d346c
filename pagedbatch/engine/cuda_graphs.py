"""CUDA graphs for decode steps, one per batch-size bucket, and for small prefill steps, one per token bucket.

A decode step of a 7B model is ~6-8 ms of GPU work but ~1 ms of kernel
launches when run eagerly, so decode runs as a replayed graph. Inputs live
in static buffers sized for the largest bucket; a batch of B rows runs the
smallest bucket >= B, and the padding rows write their K/V into a scratch
block that no sequence owns and attend to it alone.

The attention backend must size its launches from host ints that are fixed
per bucket: the graphs are captured with ``max_seq_len = max_model_len``.

Prefill and mixed steps of up to ``prefill_graph_max_tokens`` tokens (8192)
run as graphs too (``PrefillGraphs``): a single-stream job's first step, 128
tokens of a 7B model, is ~5 ms of GPU work behind ~30 ms of eager launches
(H200, 2026-12-04: Triton's Python launch path and cuBLAS's per-call
heuristics cost 40-80 us each, ~250 of them), and a small model's full
8,192-token step with fp8 weights is ~18 ms of GPU work behind ~14 ms of
launches, which a slower host turns host-bound (config.py has the numbers).

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


class _BucketGraphs:
    """One graph per bucket of a step's size, replayed on static input buffers; what both kinds share."""

    def __init__(self, model, kv_caches, cos_sin, backend, buckets: list[int], *, max_model_len: int,
                 scratch_block: int, block_size: int, synchronize, capture_error_mode: str):
        self.model, self.kv_caches, self.cos_sin, self.backend = model, kv_caches, cos_sin, backend
        self.buckets = buckets
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._synchronize = synchronize  # the runner's: with TP it fails instead of hanging on a dead worker
        self._capture_error_mode = capture_error_mode

    def _meta(self, size: int) -> AttentionMetadata:
        raise NotImplementedError

    def _capture_buckets(self) -> None:
        for size in reversed(self.buckets):  # largest first so smaller graphs reuse its memory pool
            meta = self._meta(size)
            for _ in range(2):  # warm-up: compile kernels, settle allocations
                self.out[:size] = self.model(self.ids[:size], self.kv_caches, self.cos_sin, meta, self.backend)
            self._synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode=self._capture_error_mode):
                self.out[:size] = self.model(self.ids[:size], self.kv_caches, self.cos_sin, meta, self.backend)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[size] = g
        self._synchronize()

    def bucket_for(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"{n} exceeds the largest graph bucket {self.buckets[-1]}")


class DecodeGraphs(_BucketGraphs):
    def __init__(self, model, kv_caches, cos_sin, backend, *, max_batch: int, max_blocks_per_seq: int,
                 max_model_len: int, scratch_block: int, block_size: int, hidden_size: int, dtype, device,
                 synchronize=torch.cuda.synchronize, capture_error_mode: str = "global"):
        super().__init__(model, kv_caches, cos_sin, backend, graph_buckets(max_batch), max_model_len=max_model_len,
                         scratch_block=scratch_block, block_size=block_size, synchronize=synchronize,
                         capture_error_mode=capture_error_mode)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        # ids, positions and slots as the rows of one buffer: a step's three arrive in one copy (run's ``ips``).
        self.ips = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.ids, self.positions, self.slots = self.ips.unbind(0)
        self.slots.fill_(self.scratch_slot)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.out = torch.zeros(n, hidden_size, dtype=dtype, device=device)

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
        self._capture_buckets()

    def run(self, ips: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's hidden states [b, hidden] (a view of the graphs' output buffer).

        ``ips``: the step's ids, positions and slots as one [3, b] int64 tensor
        (``StepInputs.ids_positions_slots``), copied in one kernel; seq_lens and block_tables may be int64
        (``unpack(int32=False)``): the copies convert them. Each op before the replay costs the GPU an idle gap
        of ~1-5 us at one row (H100, 2026-12-05, bench/profile_steps.py --timeline)."""
        b = meta.num_seqs
        size = self.bucket_for(b)
        w = meta.block_tables.shape[1]
        self.ips[:, :b].copy_(ips)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :w].copy_(meta.block_tables)
        if size > b:  # padding rows: attend to the scratch block only
            self.positions[b:size].zero_()
            self.slots[b:size].fill_(self.scratch_slot)
            self.seq_lens[b:size].fill_(1)
            self.block_tables[b:size, 0].fill_(self.scratch_block)
        self.graphs[size].replay()
        return self.out[:b]


# Above this many tokens the prefill buckets step by it instead of doubling: a step pads to its bucket, and
# at thousands of tokens the padding is GPU work (a 7B's 5,000-token step would run 8,192 tokens' matmuls).
PREFILL_BUCKET_STEP = 1024


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts the prefill graphs are captured for: powers of two from 16 up to ``PREFILL_BUCKET_STEP``,
    then its multiples, and ``max_tokens`` itself (a step pads by less than ``PREFILL_BUCKET_STEP`` tokens)."""
    out, t = [], 16
    while t < max_tokens:
        out.append(t)
        t = t * 2 if t < PREFILL_BUCKET_STEP else t + PREFILL_BUCKET_STEP
    return out + [max_tokens]


class PrefillGraphs(_BucketGraphs):
    """Graphs for steps that are not decode-only, of up to ``max_tokens`` tokens, one per token bucket.

    A step of T tokens and S sequences runs the bucket Tb >= T, captured for Sb = min(Tb, max_seqs)
    sequences. The padding follows what the Triton prefill kernel already allows: sequences S..Sb-1 are
    empty (their query_start_loc entries repeat T), so their tiles return at once, and tokens T..Tb-1
    belong to no sequence: no tile reads or writes them, their K/V go to the scratch block, and their
    rows of the output are never read (the LM head takes only the step's sampling rows, all below T).
    Every other op of the forward is row-wise, so padding rows cannot reach a real row.
    The kernels' launch sizes depend only on (Tb, Sb): the attention grid is Tb // BLOCK_Q + Sb tiles,
    its tile height is the one for a Tb-token query.
    """

    def __init__(self, model, kv_caches, cos_sin, backend, *, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, scratch_block: int, block_size: int,
                 hidden_size: int, dtype, device, synchronize=torch.cuda.synchronize,
                 capture_error_mode: str = "global"):
        super().__init__(model, kv_caches, cos_sin, backend, prefill_buckets(max_tokens),
                         max_model_len=max_model_len, scratch_block=scratch_block, block_size=block_size,
                         synchronize=synchronize, capture_error_mode=capture_error_mode)
        self.max_tokens = self.buckets[-1]
        self.max_seqs = max_seqs
        t, s = self.max_tokens, self.seqs_for(self.max_tokens)
        self.ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slots = torch.full((t,), self.scratch_slot, dtype=torch.int64, device=device)
        self.qsl = torch.zeros(s + 1, dtype=torch.int32, device=device)  # every sequence empty until a run
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.block_tables = torch.full((s, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.out = torch.zeros(t, hidden_size, dtype=dtype, device=device)
        self.replays = 0
        # Each bucket's batch (views of the buffers above): built once, not at every step.
        self._metas = {size: self._bucket_meta(size) for size in self.buckets}

    def seqs_for(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def _meta(self, t: int) -> AttentionMetadata:
        return self._metas[t]

    def _bucket_meta(self, t: int) -> AttentionMetadata:
        s = self.seqs_for(t)
        return AttentionMetadata(
            positions=self.positions[:t], slot_mapping=self.slots[:t], query_start_loc=self.qsl[: s + 1],
            seq_lens=self.seq_lens[:s], block_tables=self.block_tables[:s], num_seqs=s, num_tokens=t,
            max_query_len=t, max_seq_len=self.max_model_len)

    def fits(self, meta: AttentionMetadata) -> bool:
        return not meta.is_decode_only and meta.num_tokens <= self.max_tokens

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """``pool``: a memory pool to share (the decode graphs'): only one graph runs at a time, and each
        copies its result into a buffer of its own, so no graph's memory outlives its replay."""
        self.pool = pool
        self._capture_buckets()

    def stage(self, ids: torch.Tensor, meta: AttentionMetadata) -> tuple[int, AttentionMetadata]:
        """Copy one step's inputs into the static buffers, padded to its bucket; return the bucket and the
        padded batch's metadata (what the graph was captured with)."""
        t, s = meta.num_tokens, meta.num_seqs
        size = self.bucket_for(t)
        w = meta.block_tables.shape[1]
        self.ids[:t].copy_(ids)
        self.positions[:t].copy_(meta.positions)
        self.slots[:t].copy_(meta.slot_mapping)
        self.qsl[: s + 1].copy_(meta.query_start_loc)
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.block_tables[:s, :w].copy_(meta.block_tables)
        if size > t:  # tokens of no sequence: position 0, K/V into the scratch block
            self.positions[t:size].zero_()
            self.slots[t:size].fill_(self.scratch_slot)
        meta_b = self._metas[size]
        if meta_b.num_seqs > s:  # empty sequences after the last real one
            self.qsl[s + 1 : meta_b.num_seqs + 1].fill_(t)
        return size, meta_b

    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        size, _ = self.stage(ids, meta)
        self.graphs[size].replay()
        self.replays += 1
        return self.out[: meta.num_tokens]
