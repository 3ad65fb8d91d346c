"""Paged decode attention in Triton: one query per sequence, flash-decoding over GQA groups.

Program (sequence, kv head, split) holds every query head of its KV group,
so each K/V byte is read once per group; splits of a sequence's KV range
write a partial output and its log2-sum-exp to a float32 workspace that
``_decode_reduce_kernel`` merges. Two kernels, chosen by ``DecodeConfig``:

- ``v1``, the first kernel (kept for comparison): per 64-key tile it loads
  the tile's block ids, then K, computes the scores and softmax, then loads
  V: three dependent memory round trips per tile, every tile masked.
- ``v2``: the next tile's block ids are loaded one tile ahead; K and V are
  issued back to back before any math, so both are in flight together;
  full tiles are unmasked and only a sequence's last tile is masked; a
  tile inside one cache block takes one scalar table entry. Scores use
  ``tl.dot`` over the group padded to 16 rows, or, for small groups when
  ``lanes_max_group`` allows, plain multiply-adds with a separate
  online-softmax state per key slot, so the loop has no cross-warp
  reduction (the 16-row padding wastes 8x the MMA work on a group of 2,
  and the row max/sum of a dot's accumulator crosses warps through shared
  memory every tile) at the price of more instructions per byte.

Why v1 reads KV at about half the copy bandwidth is argued in
docs/benchmarks.md ("Decode attention"); ``bench/decode_attention.py``
times every configuration in ``DECODE_CONFIGS``.

fp8 caches (``kv_quant.py``): tiles are converted to fp16 as they are
loaded (``_fp8_to_f16``: paired conversions, before the tile's layout change
into the dot operand) and the query to fp16 once; the K scale is folded into the softmax scale and the V
scale into the final normalisation, so no element is multiplied by a scale.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .. import pdl
from ..pdl import wait_for_producer
from .kv_quant import checked_scale
from .triton_kernels import (LOG2E, _check_head_dim, _dot_precision, _fp8_to_f16, _last_dim_contiguous,
                             check_k_cache, fp8_mma_runs, fp8_tile_convert, v_key_run)


@dataclass(frozen=True)
class DecodeConfig:
    """One way to launch paged decode; every field is a tuning knob (see DECODE_CONFIGS)."""

    kernel: str = "v2"  # "v1" | "v2"
    block_n: int = 64  # keys per loop iteration with tl.dot (a power of two >= 16)
    num_warps: int = 4
    num_stages: int = 2  # Triton's software pipelining of the loop's loads (1: none)
    lanes_max_group: int = 0  # v2: groups up to this size use multiply-adds instead of tl.dot
    lanes_block_n: int = 16  # ... with this many keys per iteration (its state is [group, keys, head_dim])
    prefetch_table: bool = True  # v2: load tile t+1's block ids during tile t
    early_v: bool = True  # v2: issue the V load with the K load, before the softmax math
    # v2, fp8 caches: run the tile dots in fp16 (q converted once): e4m3 -> fp16 is one instruction per
    # pair of values on Hopper, e4m3 -> bf16 goes through fp32 (measured 2026-12-03: the bf16 route
    # read an fp8 cache at only ~1.5 TB/s, slower per call than a bf16 cache of twice the bytes).
    fp8_via_f16: bool = True
    # ... and convert the tiles with PTX's paired e4m3 -> fp16 instruction in the layout they were loaded
    # in (``_fp8_to_f16``; GPUs with fp8, not the interpreter). Without it Triton converts after moving
    # the tile into the dot's operand layout, reading the V tile from shared memory a byte at a time.
    # H200, 2026-12-04: 132.9 us against 141.5 on W1's shape, 170.2 against 171.8 on W-nano's.
    fp8_asm: bool = True
    # v2, key-contiguous V: load the sequence's last (masked) tile of V whole and zero the keys past the end,
    # instead of a masked load (which Triton issues a byte at a time along the contiguous keys). Slower with
    # the fp16-converting kernel (H200 2026-12-04: 150.0 / 118.0 us against 137.8 / 113.4 on the W-nano and
    # W1 shapes), faster with fp8_mma (the fp8 default since the seventh session); see DECODE_CONFIGS.
    whole_v_tail: bool = False
    # v2 with tl.dot: keep the softmax denominators per (head, key slot) and sum them over the keys once after
    # the loop. A tile's keys are spread over the warps, so a per-tile sum crosses warps (shared memory and a
    # barrier) on the loop's critical path; the tile-shaped accumulator costs 8 registers a thread.
    defer_l_sum: bool = False
    # v2, fp8 caches, GPUs with fp8 MMAs (sm_89+): both tile products on fp8 tensor cores, so no tile element is
    # converted. Hopper's wgmma needs 64 rows, so the products are transposed (S^T = K Q^T, O^T += V^T P^T:
    # keys and head_dim as M, the group padded to 16 as N) and read K and the key-contiguous V straight from
    # shared memory. The query (per-head scale) and the probabilities (times 2^8, into e4m3's normal range)
    # each go in as two e4m3 terms, hi + lo: one e4m3 query had errors up to 0.3 on peaked attention (torch
    # emulation, bench/fp8_attention_precision.py), hi + lo is as close to the float32 reference as bf16.
    fp8_mma: bool = False
    # ... with groups of up to 8 heads, both terms in one product: the query's hi and lo rows (and the
    # probabilities' hi and lo columns) side by side in the MMA's 16 columns, each head's pair in adjacent
    # columns (one thread's), summed after the first product and once after the loop: half the fp8 MMAs.
    fp8_pack: bool = False
    # Split-K: aim for programs_per_sm programs per SM, splits of at least
    # min_tiles_per_split tiles, at most max_splits splits.
    programs_per_sm: int = 4
    min_tiles_per_split: int = 4
    max_splits: int = 16
    # Split-K by waves instead (when > 0): how many of this kernel's programs fit on one SM at once (registers
    # and shared memory of its sm_90 build, bench/kernel_sass.py). The split count then minimizes the waves of
    # programs times the tiles per split: one program too many starts a second wave that costs as much as the
    # first (H200 2026-12-04, 32 x 8,192 keys, fp8: 4 splits in one wave 101.3 us, 5 in two 134.2).
    resident_per_sm: int = 0
    # Registers per thread the compiler may use (PTX .maxnreg; 0: its own choice): fewer registers, more
    # programs per SM. It did not make the fp8 kernel faster (v2-f8mma-s2-r80 in DECODE_CONFIGS).
    max_registers: int = 0

    def __post_init__(self) -> None:
        if self.kernel not in ("v1", "v2"):
            raise ValueError(f"DecodeConfig.kernel must be 'v1' or 'v2', got {self.kernel!r}")
        for name in ("block_n", "lanes_block_n"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps/num_stages: {self.num_warps}/{self.num_stages}")
        if min(self.programs_per_sm, self.min_tiles_per_split, self.max_splits) < 1:
            raise ValueError("programs_per_sm, min_tiles_per_split and max_splits must be >= 1")
        if self.resident_per_sm < 0:
            raise ValueError(f"resident_per_sm must be >= 0, got {self.resident_per_sm}")
        if self.max_registers and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be 0 or 24..255, got {self.max_registers}")

    def uses_dot(self, group: int) -> bool:
        return self.kernel == "v1" or group > self.lanes_max_group

    def tile(self, group: int) -> int:
        """Keys per loop iteration for a GQA group of this size."""
        return self.block_n if self.uses_dot(group) else self.lanes_block_n

    def num_splits(self, num_seqs: int, num_kv_heads: int, group: int, max_seq_len: int, num_sms: int) -> int:
        if self.resident_per_sm:
            return choose_num_splits_by_waves(num_seqs, num_kv_heads, max_seq_len, self.tile(group), num_sms,
                                              self.resident_per_sm, self.max_splits, self.min_tiles_per_split)
        return choose_num_splits(num_seqs, num_kv_heads, max_seq_len, self.tile(group), num_sms, self.max_splits,
                                 self.min_tiles_per_split, self.programs_per_sm)


_V2 = DecodeConfig()
# Named configurations: the benchmark sweeps them, the backend takes any by name.
DECODE_CONFIGS: dict[str, DecodeConfig] = {
    # The kernel as of 0a4336f: 3.35 TB/s (82% of copy) on the W-nano shape, measured 2026-12-03.
    "v1": DecodeConfig(kernel="v1", block_n=64, num_warps=4, num_stages=2, lanes_max_group=0),
    # v2 with v1's tile, warps and stages: what the structure alone gains.
    "v2": _V2,
    # One knob at a time.
    "v2-no-prefetch": dataclasses.replace(_V2, prefetch_table=False),
    "v2-late-v": dataclasses.replace(_V2, early_v=False),
    "v2-stages1": dataclasses.replace(_V2, num_stages=1),
    "v2-stages3": dataclasses.replace(_V2, num_stages=3),
    "v2-warps2": dataclasses.replace(_V2, num_warps=2),
    "v2-warps8": dataclasses.replace(_V2, num_warps=8),
    "v2-n32": dataclasses.replace(_V2, block_n=32),
    # fp8 tiles carry half the bytes: twice the keys per iteration moves as many bytes as bf16's 64.
    "v2-n128-w8": dataclasses.replace(_V2, block_n=128, num_warps=8),
    # Groups of 1-2 (W-nano's 16 q / 8 kv heads) on multiply-add lanes instead of a 16-row tl.dot.
    "v2-lanes": dataclasses.replace(_V2, lanes_max_group=2),
    "v2-lanes32-w8": dataclasses.replace(_V2, lanes_max_group=2, lanes_block_n=32, num_warps=8),
    # Split policy: more, shorter programs (less tail from long sequences) against partial-output traffic.
    "v2-pps16": dataclasses.replace(_V2, programs_per_sm=16, min_tiles_per_split=2),
    "v2-nosplit": dataclasses.replace(_V2, max_splits=1),
    # fp8 caches: tiles converted to the query's dtype (bf16) instead of fp16, for comparison.
    "v2-fp8-bf16": dataclasses.replace(_V2, fp8_via_f16=False),
    "v2-stages3-fp8-bf16": dataclasses.replace(_V2, num_stages=3, fp8_via_f16=False),
    "v2-splits4": dataclasses.replace(_V2, max_splits=4),
    # fp8 caches: Triton's own cast to fp16 (the default until 2026-12-04), for comparison.
    "v2-cast": dataclasses.replace(_V2, fp8_asm=False),
    "v2-stages3-cast": dataclasses.replace(_V2, num_stages=3, fp8_asm=False),
    # Key-contiguous fp8 V: the masked last tile loaded whole, and longer or deeper-pipelined tiles.
    "v2-stages3-vtail": dataclasses.replace(_V2, num_stages=3, whole_v_tail=True),
    "v2-n128-s3": dataclasses.replace(_V2, block_n=128, num_stages=3),
    "v2-stages4": dataclasses.replace(_V2, num_stages=4),
    # fp8: with the paired conversion a 64-key tile costs the instructions of a bf16 tile of twice the bytes;
    # longer tiles amortize the softmax (measured: no faster, 2026-12-04).
    "v2-n128": dataclasses.replace(_V2, block_n=128),
    # Each softmax row sum kept per key slot and reduced once after the loop: one cross-warp reduction (shared
    # memory and a barrier) less per tile. H200 2026-12-04: bf16 156.8 against 177.7 us on W-nano's shape.
    "v2-stages3-lt": dataclasses.replace(_V2, num_stages=3, defer_l_sum=True),
    # fp8 caches: both tile products on Hopper's fp8 MMAs (wgmma), see DecodeConfig.fp8_mma.
    "v2-f8mma-lt": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, defer_l_sum=True),
    # Split counts (H200 2026-12-04, fourth session): at batch 1 fewer splits (8: 5.3 against 5.8 us, fp8); on
    # 32 x 8,192 keys the wave count decides: v2-f8mma-lt fits 4 programs per SM, so 4 splits (pps3: 512
    # programs, one wave) take 101.3 us and 5 splits (640, a second wave) 134.2.
    "v2-lt-splits4": dataclasses.replace(_V2, num_stages=3, defer_l_sum=True, max_splits=4),
    "v2-lt-splits8": dataclasses.replace(_V2, num_stages=3, defer_l_sum=True, max_splits=8),
    "v2-f8mma-lt-pps3": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, defer_l_sum=True, programs_per_sm=3),
    "v2-f8mma-lt-pps8": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, defer_l_sum=True, programs_per_sm=8),
    "v2-f8mma-lt-s2": dataclasses.replace(_V2, fp8_mma=True, defer_l_sum=True),
    # fp8 MMAs on 128-key tiles, one m64 wgmma per warpgroup: the per-tile chain (cross-warp max, probabilities
    # through shared memory) amortized over twice the keys. H200 2026-12-04: 28-40% slower (2 programs per SM).
    "v2-f8mma-lt-n128-w8": dataclasses.replace(_V2, block_n=128, num_warps=8, fp8_mma=True, defer_l_sum=True),
    # Split counts by waves (DecodeConfig.resident_per_sm, from the sm_90 builds: v2-stages3-lt 168 registers
    # and 70 KB (bf16) or 38 KB (fp8) of shared memory, 3 programs per SM; v2-f8mma-lt 128 and 53 KB, 4).
    "v2-lt-waves": dataclasses.replace(_V2, num_stages=3, defer_l_sum=True, resident_per_sm=3),
    "v2-f8mma-lt-waves": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, defer_l_sum=True, resident_per_sm=4),
    # The partial last tile's V loaded whole and its keys past the end zeroed after (DecodeConfig.whole_v_tail),
    # now with fp8 MMAs: the masked load was 64 byte loads a thread, and that tile (once per program) ~17% of the
    # warps' stall samples on W-nano's shape (ncu, H200 2026-12-04, seventh session). 125.2 against 128.7 us on
    # W-nano's shape, 103.6 / 104.5 on W1's, 5.7 / 6.2 at batch 1, 102.5 / 101.5 on 32 x 8,192 keys.
    "v2-f8mma-lt-vtail-waves": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, defer_l_sum=True,
                                                   whole_v_tail=True, resident_per_sm=4),
    # ... and both e4m3 terms in one product (DecodeConfig.fp8_pack): 268 instructions a tile against 371, 8
    # QGMMA against 16. H200, seventh session (call H): 112.8 against 124.4 us on W-nano's shape, 91.7 / 101.7
    # on W1's, 97.4 / 100.1 on 32 x 8,192 keys, 5.5 / 5.7 at batch 1.
    "v2-f8mma-pack-vtail-waves": dataclasses.replace(_V2, num_stages=3, fp8_mma=True, fp8_pack=True, defer_l_sum=True,
                                                     whole_v_tail=True, resident_per_sm=4),
    # Six programs per SM instead of four (2 stages, 80 registers, no spills in the loop): slower (151.9 against
    # 133.6 us on W-nano's shape, 124.6 / 108.1 on W1's; 96 registers and 5 programs: 138.8 / 111.1). The tile's
    # time is not latency that more warps hide (docs/benchmarks.md, seventh session).
    "v2-f8mma-s2-r80": dataclasses.replace(_V2, num_stages=2, fp8_mma=True, defer_l_sum=True, max_registers=80,
                                           resident_per_sm=6),
    # With 64-token KV blocks (the GPU default since the nineteenth session) the packed kernel takes 80 registers:
    # two stages then fit six programs per SM without a register cap (sm_90: 35 KB of shared memory). Not yet
    # measured (a device call for it got no machine).
    "v2-f8mma-pack-vtail-s2-waves6": dataclasses.replace(_V2, num_stages=2, fp8_mma=True, fp8_pack=True,
                                                         defer_l_sum=True, whole_v_tail=True, resident_per_sm=6),
}
# The configuration the engine uses, by bytes per cached element (bf16/fp16: 2, fp8: 1, float32: 4).
# bench/decode_attention.py prints the best per case: change these names to switch.
# H200, 2026-12-04 (docs/benchmarks.md, fifth session, call A): fp8 v2-f8mma-lt-waves the fastest on every
# batch shape (W-nano 125.8 against v2-stages3-lt's 138.9 us, W1 104.4 / 113.7, 32 x 8,192 keys 99.7 / 120.1;
# batch 1 6.2 / 6.0); since the seventh session with the last tile's V loaded whole and, for groups of up to 8,
# both e4m3 terms in one product (v2-f8mma-pack-vtail-waves; larger groups run it without the packing);
# bf16 v2-lt-waves (deferred row sums: 4.04 TB/s on W-nano's shape, 96% of copy) 151.8
# against v2-stages3-lt's 156.6 on 32 x 8,192 keys and the same launch elsewhere.
DEFAULT_DECODE_CONFIG: dict[int, str] = {1: "v2-f8mma-pack-vtail-waves", 2: "v2-lt-waves", 4: "v2"}


def resolve_decode_config(config: Union[str, DecodeConfig, None], kv_dtype: torch.dtype) -> DecodeConfig:
    if config is None:
        config = DEFAULT_DECODE_CONFIG.get(kv_dtype.itemsize, "v2")
    if isinstance(config, DecodeConfig):
        return config
    if config not in DECODE_CONFIGS:
        raise ValueError(f"unknown decode config {config!r}; known: {', '.join(DECODE_CONFIGS)}")
    return DECODE_CONFIGS[config]


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    num_sms: int = 132,
    max_splits: int = 16,
    min_tiles_per_split: int = 4,
    programs_per_sm: int = 4,
) -> int:
    """Host-only split-K choice: enough programs for ``programs_per_sm`` per SM, but never
    a split shorter than ``min_tiles_per_split`` KV tiles (its partial-output
    round trip would cost more than it saves). Depends only on its int
    arguments, so a CUDA-graph bucket with a fixed ``max_seq_len`` bound gets a fixed value."""
    base = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(programs_per_sm * num_sms, base)
    by_length = max(1, triton.cdiv(max(max_seq_len, 1), block_n) // min_tiles_per_split)
    return max(1, min(want, by_length, max_splits))


def choose_num_splits_by_waves(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    num_sms: int,
    resident_per_sm: int,
    max_splits: int = 16,
    min_tiles_per_split: int = 4,
) -> int:
    """Host-only split-K choice for a kernel of which ``resident_per_sm`` programs run on an SM at once.

    Without splitting, a batch that already fills every slot of the GPU once (programs >= slots) runs
    unsplit: over several waves the GPU's scheduler balances uneven sequences, and splits only add
    partial-output traffic. A smaller batch takes the split count s minimizing waves(s) x tiles per split
    (waves(s) = ceil(programs / slots), as for equally long sequences), the fewest splits within 5% of
    the best. Never a split shorter than ``min_tiles_per_split`` tiles. Like ``choose_num_splits``, a
    function of its ints alone (a CUDA-graph bucket's ``max_seq_len`` bound gives a fixed count)."""
    base = max(1, num_seqs * num_kv_heads)
    slots = max(1, resident_per_sm * num_sms)
    if base >= slots:
        return 1
    n_tiles = triton.cdiv(max(max_seq_len, 1), block_n)
    most = max(1, min(max_splits, n_tiles // min_tiles_per_split))
    cost = [triton.cdiv(base * s, slots) * triton.cdiv(n_tiles, s) for s in range(1, most + 1)]
    best = min(cost)
    return next(s for s, c in enumerate(cost, 1) if c <= 1.05 * best)


def decode_workspace_shape(num_seqs: int, num_heads: int, num_splits: int, head_dim: int):
    """Shapes of the float32 split-K workspace: partial outputs and their log2-sum-exp."""
    return (num_seqs, num_heads, num_splits, head_dim), (num_seqs, num_heads, num_splits)


# --------------------------------------------------------------------------
# v1: the first split-K kernel
# --------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, WO, WLSE, block_tables, seq_lens, KV_SCALE, qk_scale,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_vd, s_ot, s_oh, s_bt,
    s_wot, s_woh, s_wos, s_wlt, s_wlh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr, KV_SCALED: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    # Each sequence's own tiles are divided among the splits, so a short
    # sequence in a long bucket finishes early rather than idling splits.
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + seq * s_qt + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    bt_row = block_tables + seq * s_bt
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(KV_SCALE)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t in range(t_lo, t_hi):
        kv_pos = t * BLOCK_N + offs_n
        nmask = kv_pos < seq_len
        # Masked: table entries and cache slots past the end may hold anything.
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = kv_pos % BLOCK_SIZE
        k = tl.load(K + blk[:, None] * s_kb + row[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                    mask=nmask[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile below n_tiles has a valid key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + blk[:, None] * s_vb + row[:, None] * s_vs + kvh * s_vh + offs_d[None, :] * s_vd,
                    mask=nmask[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new

    l_safe = tl.where(l == 0.0, 1.0, l)  # empty split, or a zero-length padding row
    if KV_SCALED:
        out = acc * (tl.load(KV_SCALE + 1) / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(O + seq * s_ot + heads[:, None] * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        tl.store(WO + seq * s_wot + heads[:, None] * s_woh + split * s_wos + offs_d[None, :], out,
                 mask=gmask[:, None])
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(l_safe))
        tl.store(WLSE + seq * s_wlt + heads * s_wlh + split, lse, mask=gmask)


# --------------------------------------------------------------------------
# v2
# --------------------------------------------------------------------------


@triton.jit
def split_tiles(seq_len, split, num_splits, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """(first tile, end tile, end of the full tiles) of one program's split of a sequence's keys: the
    sequence's own tiles are divided among the splits (a short one in a long bucket finishes early); tiles
    below the third hold BLOCK_N keys and need no masks. Also bench/decode_stream_probe.py's."""
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    if SPLIT:
        per_split = tl.cdiv(n_tiles, num_splits)
        t_lo = split * per_split
        t_hi = tl.minimum(t_lo + per_split, n_tiles)
    else:
        t_lo = seq_len * 0
        t_hi = n_tiles
    return t_lo, t_hi, tl.minimum(t_hi, seq_len // BLOCK_N)


@triton.jit
def _tile_blocks(bt_row, t, seq_len, offs_n, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Block ids of tile t: one scalar when the tile lies inside one block, else
    # one per key (repeated entries are one transaction per warp). Masked: past
    # the sequence's last block the table row may end.
    if BLOCK_N <= BLOCK_SIZE:
        blk = tl.load(bt_row + (t * BLOCK_N) // BLOCK_SIZE, mask=t * BLOCK_N < seq_len, other=0)
    else:
        pos = t * BLOCK_N + offs_n
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)
    return blk


@triton.jit
def _decode_tile(
    m, l, acc, q, qk_scale, blk, t, seq_len, Kh, Vh, s_kb, s_ks, s_vb, s_vs, s_vd, offs_n, offs_d,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr,
    EARLY_V: tl.constexpr, PREC: tl.constexpr, ASM: tl.constexpr, ASM_V: tl.constexpr, V_KEYS: tl.constexpr,
    WHOLE_V_TAIL: tl.constexpr, F8MMA: tl.constexpr, q_lo, L_TILE: tl.constexpr, PACK: tl.constexpr = False,
):
    b64 = blk.to(tl.int64)
    if BLOCK_N <= BLOCK_SIZE:
        rows = (t * BLOCK_N) % BLOCK_SIZE + offs_n
    else:
        rows = offs_n % BLOCK_SIZE  # tiles start on block boundaries
    k_ptrs = Kh + (b64 * s_kb + rows * s_ks)[:, None] + offs_d[None, :]
    v_off = (b64 * s_vb + rows * s_vs)[:, None] + offs_d[None, :] * s_vd
    if V_KEYS:
        # A key-contiguous V (s_vs == 1): a block's keys are adjacent, which Triton cannot see through the
        # block ids (loaded, and carried across iterations); without the hint it loads V a byte at a time.
        v_off = tl.max_contiguous(tl.multiple_of(v_off, [V_KEYS, 1]), [V_KEYS, 1])
    v_ptrs = Vh + v_off
    nmask = t * BLOCK_N + offs_n < seq_len
    # WHOLE_V_TAIL (set only with V_KEYS): a key-contiguous V is loaded whole and its keys past the end zeroed
    # after (as in the prefill kernel's _attend_kv_range): a mask along its contiguous keys loads it a byte
    # at a time.
    V_MASKED: tl.constexpr = MASKED and not WHOLE_V_TAIL
    if MASKED:
        k = tl.load(k_ptrs, mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if EARLY_V:
        if V_MASKED:
            v = tl.load(v_ptrs, mask=nmask[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
    if ASM:
        k = _fp8_to_f16(k, True)
    if ASM_V and EARLY_V:
        v = _fp8_to_f16(v, True)

    if F8MMA:  # DecodeConfig.fp8_mma: transposed products, every operand e4m3 (q = q + q_lo)
        if PACK:  # q holds each head's hi and lo rows interleaved: the scores are the column pairs' sums
            st = tl.dot(k, tl.trans(q))
            st = tl.sum(tl.reshape(st, (BLOCK_N, st.shape[1] // 2, 2)), 2) * qk_scale
        else:
            st = tl.dot(k, tl.trans(q_lo))
            st = tl.dot(k, tl.trans(q), st) * qk_scale
        if MASKED:
            st = tl.where(nmask[:, None], st, float("-inf"))
        m_new = tl.maximum(m, tl.max(st, 0))
        alpha = tl.exp2(m - m_new)
        # p times 2^8 (l too, so it cancels): e4m3 keeps its 3 mantissa bits down to 2^-14 of the max.
        p = tl.exp2(st - m_new[None, :] + 8.0)
        if L_TILE:
            l = l * alpha[None, :] + p
        else:
            l = l * alpha + tl.sum(p, 0)
    elif DOT:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale
        if MASKED:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds a valid key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        if L_TILE:
            l = l * alpha[:, None] + p
        else:
            l = l * alpha + tl.sum(p, 1)
    else:
        # One online-softmax state per (head, key slot): no reduction over keys in the loop.
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * qk_scale
        if MASKED:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a masked slot never seen a key
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe)
        l = l * alpha + p

    if not EARLY_V:
        if V_MASKED:
            v = tl.load(v_ptrs, mask=nmask[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if ASM_V:
            v = _fp8_to_f16(v, True)
    if MASKED and WHOLE_V_TAIL:
        v = tl.where(nmask[:, None], v.to(q.dtype), 0.0)  # stale slots may hold NaN patterns: 0 * NaN is NaN
    if F8MMA:
        p_hi = p.to(v.dtype)
        if PACK:  # acc's columns 2h and 2h + 1: head h's products with its hi and lo probabilities
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            p2 = tl.reshape(tl.join(p_hi.to(tl.float32), p_lo.to(tl.float32)), (BLOCK_N, 2 * p.shape[1]))
            alpha2 = tl.reshape(tl.join(alpha, alpha), (2 * p.shape[1],))
            acc = tl.dot(tl.trans(v), p2.to(v.dtype), acc * alpha2[None, :])
        else:
            acc = tl.dot(tl.trans(v), p_hi, acc * alpha[None, :])
            acc = tl.dot(tl.trans(v), (p - p_hi.to(tl.float32)).to(v.dtype), acc)
    elif DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
    else:
        acc = acc * alpha[:, :, None] + p[:, :, None] * v.to(tl.float32)[None, :, :]
    return m_new, l, acc


@triton.jit
def _decode_v2_kernel(
    Q, K, V, O, WO, WLSE, block_tables, seq_lens, KV_SCALE, qk_scale, num_splits,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_vd, s_ot, s_oh, s_bt,
    s_wot, s_woh, s_wos, s_wlt, s_wlh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, KV_SCALED: tl.constexpr,
    DOT: tl.constexpr, PREFETCH: tl.constexpr, EARLY_V: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
    ASM_V: tl.constexpr, V_KEYS: tl.constexpr, WHOLE_V_TAIL: tl.constexpr = False, F8MMA: tl.constexpr = False,
    L_TILE: tl.constexpr = False, PDL: tl.constexpr = False, PACK: tl.constexpr = False,
):
    wait_for_producer(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    t_lo, t_hi, t_full = split_tiles(seq_len, split, num_splits, BLOCK_N, SPLIT)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    if PACK:  # GROUP_PAD rows: each head twice (its hi and lo terms)
        gmask = offs_g // 2 < GROUP
        heads = kvh * GROUP + offs_g // 2
    else:
        gmask = offs_g < GROUP
        heads = kvh * GROUP + offs_g
    q = tl.load(Q + seq * s_qt + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if not DOT:
        q = q.to(tl.float32)
    if F16:  # the tiles follow q's dtype in _decode_tile
        q = q.to(tl.float16)
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(KV_SCALE)
    if F8MMA:
        # Each head's query to e4m3 with its own scale (its max maps to 448), folded into that row's score scale.
        q = q.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 448.0
        q = q / q_scale[:, None]
        q_hi = q.to(K.dtype.element_ty)
        q_lo = (q - q_hi.to(tl.float32)).to(K.dtype.element_ty)
        q = q_hi
        if PACK:  # rows 2h, 2h + 1: head h's hi and lo (q was loaded with each head's row twice)
            q = tl.where((offs_g % 2 == 1)[:, None], q_lo, q_hi)
            q_scale = tl.max(tl.reshape(q_scale, (GROUP_PAD // 2, 2)), 1)  # the pair's (equal) scales
        qk_scale = (qk_scale * q_scale)[None, :]
    else:
        q_lo = q
    HEADS: tl.constexpr = GROUP_PAD // 2 if PACK else GROUP_PAD  # the softmax state's columns
    if DOT:
        m = tl.full([HEADS], float("-inf"), tl.float32)
        l = tl.zeros([HEADS], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        if F8MMA:  # the transposed products' orientation: heads last
            acc = tl.zeros([D, GROUP_PAD], tl.float32)
        if L_TILE:  # a denominator per (head, key slot), laid out as the score tile
            if F8MMA:
                l = tl.zeros([BLOCK_N, HEADS], tl.float32)
            else:
                l = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
    else:
        m = tl.full([GROUP_PAD, BLOCK_N], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_N, D], tl.float32)
    bt_row = block_tables + seq * s_bt
    Kh = K + kvh * s_kh
    Vh = V + kvh * s_vh

    if PREFETCH:
        blk = _tile_blocks(bt_row, t_lo, seq_len, offs_n, BLOCK_SIZE, BLOCK_N)
    for t in range(t_lo, t_full):
        if PREFETCH:
            cur = blk
            blk = _tile_blocks(bt_row, t + 1, seq_len, offs_n, BLOCK_SIZE, BLOCK_N)
        else:
            cur = _tile_blocks(bt_row, t, seq_len, offs_n, BLOCK_SIZE, BLOCK_N)
        m, l, acc = _decode_tile(m, l, acc, q, qk_scale, cur, t, seq_len, Kh, Vh, s_kb, s_ks, s_vb, s_vs, s_vd,
                                 offs_n, offs_d, BLOCK_SIZE, BLOCK_N, False, DOT, EARLY_V, PREC, ASM, ASM_V,
                                 V_KEYS, WHOLE_V_TAIL, F8MMA, q_lo, L_TILE, PACK)
    t = tl.maximum(t_lo, t_full)
    if t < t_hi:  # the sequence's partial last tile, if this split has it
        cur = _tile_blocks(bt_row, t, seq_len, offs_n, BLOCK_SIZE, BLOCK_N)
        m, l, acc = _decode_tile(m, l, acc, q, qk_scale, cur, t, seq_len, Kh, Vh, s_kb, s_ks, s_vb, s_vs, s_vd,
                                 offs_n, offs_d, BLOCK_SIZE, BLOCK_N, True, DOT, EARLY_V, PREC, ASM, ASM_V,
                                 V_KEYS, WHOLE_V_TAIL, F8MMA, q_lo, L_TILE, PACK)

    if F8MMA:
        acc = tl.trans(acc)
    if DOT and L_TILE:
        l = tl.sum(l, 0 if F8MMA else 1)
    if PACK:  # rows 2h and 2h + 1 summed: head h's output; from here on one row per head
        acc = tl.sum(tl.reshape(acc, (HEADS, 2, D)), 1)
        offs_g = tl.arange(0, HEADS)
        gmask = offs_g < GROUP
        heads = kvh * GROUP + offs_g
    if not DOT:  # merge the key slots' states
        m_row = tl.max(m, 1)
        w = tl.exp2(m - tl.where(m_row == float("-inf"), 0.0, m_row)[:, None])
        l = tl.sum(l * w, 1)
        acc = tl.sum(acc * w[:, :, None], 1)
        m = m_row
    l_safe = tl.where(l == 0.0, 1.0, l)  # empty split, or a zero-length padding row
    if KV_SCALED:
        out = acc * (tl.load(KV_SCALE + 1) / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    if SPLIT:
        tl.store(WO + seq * s_wot + heads[:, None] * s_woh + split * s_wos + offs_d[None, :], out,
                 mask=gmask[:, None])
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(l_safe))
        tl.store(WLSE + seq * s_wlt + heads * s_wlh + split, lse, mask=gmask)
    else:
        tl.store(O + seq * s_ot + heads[:, None] * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _decode_reduce_kernel(
    WO, WLSE, O, s_wot, s_woh, s_wos, s_wlt, s_wlh, s_ot, s_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_producer(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D)
    smask = offs_s < NUM_SPLITS
    lse = tl.load(WLSE + seq * s_wlt + head * s_wlh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    parts = tl.load(WO + seq * s_wot + head * s_woh + offs_s[:, None] * s_wos + offs_d[None, :],
                    mask=smask[:, None], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + seq * s_ot + head * s_oh + offs_d, out.to(O.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    config: Union[str, DecodeConfig, None] = None,
    kv_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One query per sequence (row i of ``q`` belongs to sequence i), over the paged cache.
    ``workspace`` (see ``decode_workspace_shape``) is needed when ``num_splits > 1``; it is allocated if omitted.
    ``config``: a ``DecodeConfig`` or a name in ``DECODE_CONFIGS`` (None: the default for the cache dtype).
    ``kv_scale``: [k_scale, v_scale] float32, required for an fp8 cache."""
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, out, workspace,
                   resolve_decode_config(config, k_cache.dtype), kv_scale)[0]


def v2_constexprs(cfg: DecodeConfig, group: int, head_dim: int, block_size: int, num_splits: int,
                  q_dtype: torch.dtype, kv_scaled: bool, paired_fp8_cvt: bool,
                  v_key_contiguous: bool = False, fp8_mma_runs: bool = False) -> dict:
    """The compile-time arguments of ``_decode_v2_kernel`` for one launch (also bench/kernel_sass.py's).
    ``paired_fp8_cvt``: the device runs ``_fp8_to_f16``'s inline asm (``fp8_tile_convert``);
    ``v_key_contiguous``: the V cache passes ``v_key_run`` (its keys adjacent within a block);
    ``fp8_mma_runs``: the device runs a dot of two e4m3 tiles (``triton_kernels.fp8_mma_runs``)."""
    dot = cfg.uses_dot(group)
    f8mma = dot and kv_scaled and cfg.fp8_mma and fp8_mma_runs and q_dtype != torch.float32
    f16 = dot and kv_scaled and cfg.fp8_via_f16 and q_dtype != torch.float32 and not f8mma
    asm = f16 and cfg.fp8_asm and paired_fp8_cvt
    v_keys = min(cfg.tile(group), block_size) if v_key_contiguous else 0
    pack = f8mma and cfg.fp8_pack and group <= 8
    return dict(GROUP=group, GROUP_PAD=16 if pack else max(16 if dot else 1, triton.next_power_of_2(group)), D=head_dim,
                BLOCK_SIZE=block_size, BLOCK_N=cfg.tile(group), SPLIT=num_splits > 1, PREC=_dot_precision(q_dtype),
                KV_SCALED=kv_scaled, DOT=dot, PREFETCH=cfg.prefetch_table, EARLY_V=cfg.early_v,
                # A key-contiguous fp8 V tile is read from shared memory as it is and converted by Triton
                # after the layout change (bench/fp8_v_layout_study.py); converting it first would send
                # fp16 through shared memory again. K then takes Triton's cast too: with K alone converted
                # by the asm, H200 2026-12-04 (bench/decode_attention.py --v-layout key-contiguous):
                # 200.2 against 137.8 us on W-nano's shape, 163.1 against 113.4 on W1's (192 against 168
                # registers, 2 against 3 programs per SM).
                F16=f16, ASM=asm and not v_keys, ASM_V=asm and not v_keys, V_KEYS=v_keys,
                WHOLE_V_TAIL=bool(v_keys) and cfg.whole_v_tail, F8MMA=f8mma, L_TILE=dot and cfg.defer_l_sum,
                PACK=pack)


def _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, out, workspace,
            cfg: DecodeConfig, kv_scale):
    """``paged_decode``; also returns the compiled split kernel (None in the interpreter) for the benchmark."""
    B, H, D = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    _check_head_dim(D)
    if H % KVH:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({KVH})")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    check_k_cache(k_cache)
    kv_scale = checked_scale(k_cache, kv_scale)
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out, None
    group = H // KVH
    if num_splits > 1:
        if workspace is None:
            so, sl = decode_workspace_shape(B, H, num_splits, D)
            workspace = (torch.empty(so, dtype=torch.float32, device=q.device),
                         torch.empty(sl, dtype=torch.float32, device=q.device))
        wo, wlse = workspace
        ws_strides = (wo.stride(0), wo.stride(1), wo.stride(2), wlse.stride(0), wlse.stride(1))
    else:
        wo = wlse = out  # unused by the kernel without splits
        ws_strides = (0, 0, 0, 0, 0)
    scale_arg = kv_scale if kv_scale is not None else out  # unused by the kernel for an unscaled cache
    common = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), out.stride(0), out.stride(1),
              block_tables.stride(0), *ws_strides)
    if cfg.kernel == "v1":
        kernel = _decode_split_kernel[(B, KVH, num_splits)](
            q, k_cache, v_cache, out, wo, wlse, block_tables, seq_lens, scale_arg, scale * LOG2E, *common,
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK_SIZE=BS,
            BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits, PREC=_dot_precision(q.dtype),
            KV_SCALED=kv_scale is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        scaled = kv_scale is not None
        kernel = _decode_v2_kernel[(B, KVH, num_splits)](
            q, k_cache, v_cache, out, wo, wlse, block_tables, seq_lens, scale_arg, scale * LOG2E, num_splits,
            *common,
            **v2_constexprs(cfg, group, D, BS, num_splits, q.dtype, scaled, scaled and fp8_tile_convert(q.device),
                            v_key_run(v_cache, cfg.tile(group)) > 0, scaled and fp8_mma_runs(q.device)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **pdl.launch_kwargs(q.device), **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
        )
    if num_splits > 1:
        _decode_reduce_kernel[(B, H)](
            wo, wlse, out, *ws_strides, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), D=D,
            num_warps=1 if D <= 64 else 2, **pdl.launch_kwargs(q.device),
        )
    return out, kernel
