"""Build one step's device inputs (token ids, attention metadata, logits rows) from the scheduler's plan.

Everything is computed on the host with numpy into one pinned staging buffer
and reaches the GPU in one copy; the device tensors are views of it. At
batch 512 the earlier version (a pinned allocation and a handful of small
GPU indexing kernels per tensor) cost 2.6 ms of host time per step on the
H100 machine, against a ~20 ms decode step that it delays one for one.

The staging buffer is reused every step. The copy out of it is asynchronous,
so before refilling it we wait on the event recorded after the last copy;
that wait is free in the normal loop, where the step's sampled tokens have
already been read back (a full sync) before the next plan is built.

Tensor parallel: the device buffer (``StepInputs.packed``) and eight host
ints (``StepInputs.header``) are the whole step; rank 0 broadcasts them and
the other ranks rebuild the same views with ``unpack``. The step's
copy-on-write block copies travel in it too: every rank copies its own
shard of the cache.

Forks (``SchedulerOutput.forks``): a sample forked off a sequence whose
prompt this step completes samples from that sequence's hidden row, so its
logits row is that row again; the rows of ``logits_index`` are the sampling
rows, and ``sample_seqs`` names the sequence each one samples for.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import numpy as np
import torch

from .attention.metadata import AttentionMetadata
from .scheduler import SchedulerOutput
from .sequence import PENDING, Sequence


_WIDTH_STEP = 16  # block-table columns are added this many at a time (256 tokens at block size 16)
ALL_ROWS = object()  # kept_rows: the same rows as before


def kept_rows(old: list, new: list):
    """Where each of ``new`` sits in ``old`` if ``new`` is ``old`` with some rows removed (same objects, same
    order): ``ALL_ROWS`` if none was, else the list of indices; None if ``new`` is anything else."""
    if len(new) == len(old):
        return ALL_ROWS if all(map(operator.is_, new, old)) else None
    if len(new) > len(old):
        return None
    idx, j, n = [], 0, len(old)
    for s in new:
        while j < n and old[j] is not s:
            j += 1
        if j == n:
            return None
        idx.append(j)
        j += 1
    return idx


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_seqs: Optional[list[Sequence]]  # the sequence each logits row samples for (None: unpacked)
    logits_index: torch.Tensor  # [S] int64, rows of the hidden states to sample from
    copy_src: torch.Tensor  # [C] int64, KV blocks to copy before the forward pass ...
    copy_dst: torch.Tensor  # [C] int64, ... into these
    packed: torch.Tensor  # the one int64 device buffer all the tensors above are views of
    # (B, T, S, W, P, C, max_query_len, max_seq_len): what unpacking ``packed`` needs
    header: tuple[int, ...]
    # Every token's row samples, in order (logits_index is arange(T)): the hidden states need no gather.
    # Set by the builder on rank 0; False after unpack (a worker gathers the same rows).
    logits_all_rows: bool = False

    def ids_positions_slots(self) -> torch.Tensor:
        """[3, T] int64: input ids, positions and slots, one view (they sit back to back in ``packed``)."""
        T = self.header[1]
        return self.packed[: 3 * T].view(3, T)


def _offsets(B: int, T: int, S: int, W: int, P: int, C: int) -> np.ndarray:
    # Layout of the buffer (int64):
    # ids | positions | slots | logits rows | qsl | seq_lens | table | pending at | pending from | copy src | dst
    return np.cumsum([0, T, T, T, S, B + 1, B, B * W, P, P, C, C])


def packed_length(header) -> int:
    return int(_offsets(*header[:6])[-1])


def unpack(packed: torch.Tensor, header, int32: bool = True) -> StepInputs:
    """The step's tensors as views of ``packed`` (``sample_seqs`` is None: the plan is rank 0's).

    ``int32`` False leaves query_start_loc, seq_lens and block_tables int64 views too, for a step whose
    consumer converts them as it copies them (``cuda_graphs.DecodeGraphs.run``): three kernels fewer."""
    B, T, S, W, P, C, max_q, max_seq = header
    off = _offsets(B, T, S, W, P, C)
    conv = (lambda t: t.to(torch.int32)) if int32 else (lambda t: t)
    meta = AttentionMetadata(
        positions=packed[off[1] : off[2]], slot_mapping=packed[off[2] : off[3]],
        query_start_loc=conv(packed[off[4] : off[5]]), seq_lens=conv(packed[off[5] : off[6]]),
        block_tables=conv(packed[off[6] : off[7]].view(B, W)),
        num_seqs=B, num_tokens=T, max_query_len=max_q, max_seq_len=max_seq)
    return StepInputs(packed[: off[1]], meta, None, packed[off[3] : off[4]], packed[off[9] : off[10]],
                      packed[off[10] : off[11]], packed, tuple(header))


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_blocks_per_seq: Optional[int] = None):
        """``max_blocks_per_seq``: the widest block table a step may have (the CUDA graphs' buffers);
        None keeps every table at the width its longest row needs."""
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self._pin = device.type == "cuda"
        self._staging = torch.empty(0, dtype=torch.int64)
        self._copied = None  # CUDA event after the last copy out of the staging buffer
        # The last step's block table, its sequences and their table lengths (see _block_table).
        self._table: Optional[np.ndarray] = None
        self._table_seqs: list[Sequence] = []
        self._table_n_blocks: Optional[np.ndarray] = None
        self.table_rebuilds = 0

    def _stage(self, n: int) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()
        if self._staging.numel() < n:
            size = max(n, 2 * self._staging.numel())
            self._staging = torch.empty(size, dtype=torch.int64, pin_memory=self._pin)
        return self._staging.numpy()[:n]

    def _width(self, need: int) -> int:
        # Columns past a row's blocks are 0 and never read (the kernels stop at seq_lens).
        w = -(-need // _WIDTH_STEP) * _WIDTH_STEP
        return need if self.max_blocks_per_seq is None else min(w, max(need, self.max_blocks_per_seq))

    def _block_table(self, plan: SchedulerOutput, n_blocks: np.ndarray, W: int) -> np.ndarray:
        """[B, W] block ids of the plan's sequences (0-padded), updated from the last step's where it can be.

        Between two steps over the same sequences a block table only grows at its
        end, unless the plan copies blocks (copy-on-write replaces one in place),
        preempts (frees a table) or forks; those steps, and any other change of
        rows or width, rebuild it from every sequence's list (~0.3 ms at batch 256).
        Rows that left (finished sequences) are dropped from the last table, and
        the width moves in steps of ``_WIDTH_STEP`` blocks, so neither forces a rebuild.
        """
        seqs = plan.seqs
        prev = self._table
        kept = None
        if prev is not None and prev.shape[1] == W and not plan.block_copies and not plan.preempted and not plan.forks:
            kept = kept_rows(self._table_seqs, seqs)
        if kept is not None:
            if kept is not ALL_ROWS:  # rows that finished left: keep the others' rows
                prev = prev[kept]
                self._table_n_blocks = self._table_n_blocks[kept]
            for r in np.flatnonzero(n_blocks != self._table_n_blocks).tolist():
                bt = seqs[r].block_table
                prev[r, : len(bt)] = bt
                prev[r, len(bt):] = 0
            self._table, self._table_seqs, self._table_n_blocks = prev, list(seqs), n_blocks
            return prev
        B = len(seqs)
        table = np.zeros((B, W), dtype=np.int64)
        flat = np.fromiter(chain.from_iterable(s.block_table for s in seqs), dtype=np.int64, count=int(n_blocks.sum()))
        rows = np.repeat(np.arange(B), n_blocks)
        table[rows, np.arange(flat.size) - np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)] = flat
        self._table, self._table_seqs, self._table_n_blocks = table, list(seqs), n_blocks
        self.table_rebuilds += 1
        return table

    @staticmethod
    def _rows(seqs: list[Sequence], q_lens: list[int]):
        """Token ids, computed lengths, sampling rows, and where PENDING inputs go (flat token index) and
        come from (row of the step in flight)."""
        ids: list[int] = []
        ctx_list: list[int] = []
        sample_rows: list[int] = []
        pending_at: list[int] = []
        pending_from: list[int] = []
        for i, (seq, n) in enumerate(zip(seqs, q_lens)):
            c = seq.num_computed_tokens
            if n == 1:
                tok = seq.token_ids[c]
                if tok == PENDING:  # only ever a decode row's input: the token sampled last step
                    pending_at.append(len(ids))
                    pending_from.append(seq.pending_row)
                    tok = 0
                ids.append(tok)
            else:
                ids.extend(seq.token_ids[c : c + n])
            ctx_list.append(c)
            if c + n == seq.num_tokens:
                sample_rows.append(i)
        return ids, ctx_list, sample_rows, pending_at, pending_from

    @staticmethod
    def _decode_rows(seqs: list[Sequence]):
        """``_rows`` for a step of one token per sequence, in comprehensions (about twice as fast at batch 256)."""
        ctx_list = [s.num_computed_tokens for s in seqs]
        ids = [s.token_ids[c] for s, c in zip(seqs, ctx_list)]
        pending_at = [i for i, t in enumerate(ids) if t == PENDING]
        pending_from = [seqs[i].pending_row for i in pending_at]
        for i in pending_at:
            ids[i] = 0
        sample_rows = [i for i, (s, c) in enumerate(zip(seqs, ctx_list)) if c + 1 == len(s.token_ids)]
        return ids, ctx_list, sample_rows, pending_at, pending_from

    def build(self, plan: SchedulerOutput, prev_tokens: Optional[torch.Tensor] = None,
              int32: bool = True) -> StepInputs:
        """``prev_tokens``: the device output of the step in flight, for inputs still ``PENDING``.
        ``int32``: as ``unpack``'s."""
        seqs, q_lens_list = plan.seqs, plan.num_new_tokens
        B = len(seqs)
        if sum(q_lens_list) == B:
            ids, ctx_list, sample_rows, pending_at, pending_from = self._decode_rows(seqs)
        else:
            ids, ctx_list, sample_rows, pending_at, pending_from = self._rows(seqs, q_lens_list)
        T, P, C = len(ids), len(pending_at), len(plan.block_copies)
        S = len(sample_rows) + len(plan.forks)
        if P and prev_tokens is None:
            raise RuntimeError("a step input is still being sampled, but no step is in flight")
        q_lens = np.fromiter(q_lens_list, dtype=np.int64, count=B)
        ctx = np.fromiter(ctx_list, dtype=np.int64, count=B)
        seq_lens = ctx + q_lens
        n_blocks = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=B)
        W = self._width(max(int(n_blocks.max()), -(-int(seq_lens.max()) // self.block_size)))
        table = self._block_table(plan, n_blocks, W)

        off = _offsets(B, T, S, W, P, C)
        buf = self._stage(int(off[-1]))
        buf[: off[1]] = ids
        qsl = buf[off[4] : off[5]]
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:])
        buf[off[6] : off[7]] = table.ravel()
        if T == B:  # decode only: one query per sequence
            positions = buf[off[1] : off[2]]
            np.subtract(seq_lens, 1, out=positions)
            seq_of_token = np.arange(B)
        else:
            seq_of_token = np.repeat(np.arange(B), q_lens)
            positions = buf[off[1] : off[2]]
            np.add(np.arange(T) - qsl[:-1][seq_of_token], ctx[seq_of_token], out=positions)
        bs = self.block_size
        buf[off[2] : off[3]] = table[seq_of_token, positions // bs] * bs + positions % bs
        # Forked samples read their parent's row again (only steps that fork have any).
        buf[off[3] : off[4]] = qsl[1:][sample_rows + [p for p, _ in plan.forks]] - 1
        buf[off[5] : off[6]] = seq_lens
        if P:
            buf[off[7] : off[8]] = pending_at
            buf[off[8] : off[9]] = pending_from
        if C:
            buf[off[9] : off[11]].reshape(2, C)[:] = np.array(plan.block_copies, dtype=np.int64).T

        host = self._staging[: int(off[-1])]
        dev = host.to(self.device, non_blocking=True) if self._pin else host.clone()
        if self._pin:
            self._copied = torch.cuda.Event()
            self._copied.record()
        inputs = unpack(dev, (B, T, S, W, P, C, int(q_lens.max()), int(seq_lens.max())), int32)
        inputs.sample_seqs = [seqs[i] for i in sample_rows] + [child for _, child in plan.forks]
        inputs.logits_all_rows = not plan.forks and len(sample_rows) == T  # sample rows ascend: arange(T)
        if P:
            inputs.input_ids.index_copy_(0, dev[off[7] : off[8]], prev_tokens.index_select(0, dev[off[8] : off[9]]))
        return inputs
