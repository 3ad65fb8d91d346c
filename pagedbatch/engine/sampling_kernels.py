"""One-pass sampling for batches that only use temperature and greedy rows.

The torch path in ``sampler.py`` makes about eight passes over a float32 copy
of the [B, V] logits (copy, divide, noise, clamp, log, negate, add, argmax):
~0.65 ms of a 5.5-6.5 ms W-nano decode step (batch 256, vocab 151,936). This
kernel streams each row's logits once, in their own dtype, and returns per row

    greedy rows:  argmax(logits)
    other rows:   argmax(logits / T + G),  G = -log(E),  E = hashed Exp(1) noise

computed in float32 with the same operations, in the same order, as the torch
path (IEEE division, libdevice ``log1p`` and ``log`` like torch's CUDA ops), so
a seeded row picks the token the torch path picks unless two perturbed scores
are within rounding of each other. Ties go to the lowest token id, as in
``torch.argmax``.

E comes from the counter-based hash of ``sampler.hashed_exponential``, re-done
here in native 32-bit integer arithmetic: for a seeded row it is keyed by
(seed, output position); for an unseeded row by (a random key drawn from the
sampler's generator on the device for this call, row index), so unseeded rows
stay random per step and per engine seed and nothing is read on the host.

Work split: row r's vocabulary is cut into ``splits`` chunks, one program
each (grid [B, splits]), so that small batches still fill the GPU; each
program keeps a running (score, id) per lane and a second tiny kernel picks
each row's best chunk. A tile whose largest ``logits / T`` plus the largest
value G can take (``G_BOUND``) cannot beat the best score already found skips
the noise, which is exact and saves most of the arithmetic on peaked
distributions.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the torch sampler needs no Triton
    triton = None

BLOCK = 2048  # logits per program per loop iteration: 8 per thread at 8 warps (16-byte bf16 loads)
NUM_WARPS = 8
# The hash's smallest E is -log1p(-2**-33) ~= 2**-33, so G = -log(E) <= 33 * ln 2 = 22.87 < 23.
G_BOUND = 23.0


def available() -> bool:
    return triton is not None


if triton is not None:

    # sampler._mix32 (two xorshift-multiply rounds) is written out inline below: the products wrap
    # mod 2**32 natively on uint32, and the interpreter pays ~1 ms per call of a jit helper.

    @triton.jit
    def _row_key(seed, position):
        # sampler.token_hashes' key chain of (seed's high word, its low word, position); int64 inputs.
        x = (seed >> 32).to(tl.uint32) ^ 0x9E3779B9
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        x = (x ^ seed.to(tl.uint32)) + 0x9E3779B9
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        x = (x ^ position.to(tl.uint32)) + 0x9E3779B9
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _noise(key, token, INTERPRET: tl.constexpr):
        # (hash, E, G) of a row's tokens: sampler.hashed_exponential's formula, operation for operation,
        # then the torch path's G = -log(max(E, tiny)) (the clamp never binds for hashed E).
        h = key ^ (token.to(tl.uint32) * 0x9E3779B9)
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2**-32
        u = tl.minimum(u, 0.99999994039535522)  # 1 - 2**-24
        if INTERPRET:
            # No libdevice in the interpreter: float64 log1p (Kahan's form) and log, each rounded once.
            w = 1.0 - u.to(tl.float64)
            e = (tl.log(w) * u.to(tl.float64) / (w - 1.0)).to(tl.float32)
            g = -(tl.log(tl.maximum(e, 1.1754943508222875e-38).to(tl.float64)).to(tl.float32))
        else:
            e = -libdevice.log1p(-u)
            g = -libdevice.log(tl.maximum(e, 1.1754943508222875e-38))
        return h, e, g

    @triton.jit
    def _sample_kernel(
        LOGITS, stride_row, TEMP, GREEDY, SLOT, SEEDS, POSITIONS, STEP_KEY,
        PART_VAL, PART_IDX, TOKENS, V, chunk, n_splits,
        ANY_GREEDY: tl.constexpr, ANY_SAMPLED: tl.constexpr, ANY_SEEDED: tl.constexpr, ANY_UNSEEDED: tl.constexpr,
        SINGLE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr, G_BOUND: tl.constexpr,
    ):
        row = tl.program_id(0)
        split = tl.program_id(1)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, V)
        base = LOGITS + row.to(tl.int64) * stride_row
        lanes = tl.arange(0, BLOCK)
        best_val = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lo + lanes  # an all -inf chunk answers its first id, like torch.argmax
        # Static where the batch is all greedy or has no greedy row: the compiler only sees a branch
        # whose inputs exist (the sampled one reads seeds or the step key).
        if ANY_SAMPLED:
            greedy = False
            if ANY_GREEDY:
                greedy = tl.load(GREEDY + row) != 0
        else:
            greedy = True
        if greedy:
            for start in range(lo, hi, BLOCK):
                offs = start + lanes
                x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
                x = tl.where(x != x, float("inf"), x)  # a NaN wins, as in torch.argmax
                better = x > best_val
                best_val = tl.where(better, x, best_val)
                best_idx = tl.where(better, offs, best_idx)
        else:
            if ANY_SEEDED:
                slot = tl.load(SLOT + row)
                seeded = slot >= 0
                seed = tl.load(SEEDS + tl.maximum(slot, 0), mask=seeded, other=0)
                position = tl.load(POSITIONS + tl.maximum(slot, 0), mask=seeded, other=0)
                if ANY_UNSEEDED:
                    seed = tl.where(seeded, seed, tl.load(STEP_KEY))
                    position = tl.where(seeded, position, row.to(tl.int64))
            else:
                seed = tl.load(STEP_KEY)
                position = row.to(tl.int64)
            key = _row_key(seed, position)
            temp = tl.load(TEMP + row)
            top = tl.full([], float("-inf"), tl.float32)
            for start in range(lo, hi, BLOCK):
                offs = start + lanes
                x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
                xt = tl.math.div_rn(x, temp)  # torch divides with IEEE rounding; Triton's "/" does not
                xt = tl.where(xt != xt, float("inf"), xt)
                # Rounding is monotone: no score in this tile can exceed max(xt) + G_BOUND, and a
                # later id that only equals the best loses the tie, so such a tile cannot win.
                if tl.max(xt, 0) + G_BOUND > top:
                    _, _, g = _noise(key, offs, INTERPRET)
                    score = xt + g
                    better = score > best_val
                    best_val = tl.where(better, score, best_val)
                    best_idx = tl.where(better, offs, best_idx)
                    top = tl.max(best_val, 0)
        # The chunk's best: the largest score, the lowest id among lanes holding it.
        val = tl.max(best_val, 0)
        idx = tl.min(tl.where(best_val == val, best_idx, 2147483647), 0)
        if SINGLE:
            tl.store(TOKENS + row, idx.to(tl.int64))
        else:
            tl.store(PART_VAL + row * n_splits + split, val)
            tl.store(PART_IDX + row * n_splits + split, idx)

    @triton.jit
    def _reduce_kernel(PART_VAL, PART_IDX, TOKENS, n_splits, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        o = tl.arange(0, SPLITS)
        m = o < n_splits
        val = tl.load(PART_VAL + row * n_splits + o, mask=m, other=float("-inf"))
        idx = tl.load(PART_IDX + row * n_splits + o, mask=m, other=2147483647)
        tok = tl.min(tl.where(val == tl.max(val, 0), idx, 2147483647), 0)  # splits are in id order
        tl.store(TOKENS + row, tok.to(tl.int64))

    @triton.jit
    def _noise_kernel(SEEDS, POSITIONS, HASH, NOISE, V, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        # Test hook: the hash and E the sampling kernel uses, for sampler.hashed_exponential's inputs.
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        h, e, _ = _noise(_row_key(tl.load(SEEDS + row), tl.load(POSITIONS + row)), offs, INTERPRET)
        tl.store(HASH + row * V + offs, h.to(tl.int64), mask=m)
        tl.store(NOISE + row * V + offs, e, mask=m)


def _interpreting() -> bool:
    # TRITON_INTERPRET=1 turns triton.jit into the interpreter's wrapper; it has no libdevice.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sample_kernel, InterpretedFunction)


def default_splits(batch: int, vocab: int, num_sms: int) -> int:
    """Chunks per row: enough programs for ~4 per SM (one wave at 8 warps each), at least a tile each."""
    want = -(-4 * num_sms // max(batch, 1))
    return max(1, min(want, -(-vocab // BLOCK)))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, greedy: Optional[torch.Tensor],
                 seed_slot: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
                 positions: Optional[torch.Tensor], step_key: Optional[torch.Tensor], splits: int,
                 block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """[B] int64 token ids: ``argmax(logits / T + G)`` per row, plain argmax on greedy rows.

    ``temperature`` [B] float32 (ignored on greedy rows); ``greedy`` [B] bool or None when no row
    is greedy; ``seed_slot`` [B] int64 (index into ``seeds`` / ``positions``, -1 for other rows)
    or None when no row is seeded; ``step_key`` [1] int64 keys the unseeded rows, None when there
    are none. Launches two kernels (one if ``splits`` is 1); reads nothing on the host.
    ``block`` and ``num_warps`` are the tile shape (benchmarks sweep them).
    """
    if not logits.is_cuda and not _interpreting():
        raise ValueError("the fused sampling kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run it on the CPU); use Sampler(fused=None) or False")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return tokens
    chunk = -(-(-(-V // max(1, splits))) // block) * block  # whole tiles, so no chunk is empty
    n_splits = -(-V // chunk)
    single = n_splits == 1
    part_val = part_idx = tokens
    if not single:
        part_val = torch.empty(B, n_splits, dtype=torch.float32, device=logits.device)
        part_idx = torch.empty(B, n_splits, dtype=torch.int32, device=logits.device)
    # Absent inputs are never read (their constexpr flag is off); any tensor fills the slot.
    # No fp contraction: an FMA of log's last multiply with the "+ x / T" would round
    # differently from the torch path's separate kernels.
    dummy = temperature
    _sample_kernel[(B, n_splits)](
        logits, logits.stride(0), temperature,
        greedy if greedy is not None else dummy,
        seed_slot if seed_slot is not None else dummy,
        seeds if seeds is not None else dummy,
        positions if positions is not None else dummy,
        step_key if step_key is not None else dummy,
        part_val, part_idx, tokens, V, chunk, n_splits,
        ANY_GREEDY=greedy is not None, ANY_SAMPLED=seed_slot is not None or step_key is not None,
        ANY_SEEDED=seed_slot is not None, ANY_UNSEEDED=step_key is not None,
        SINGLE=single, INTERPRET=_interpreting(), BLOCK=block, G_BOUND=G_BOUND, num_warps=num_warps,
        enable_fp_fusion=False)
    if not single:
        _reduce_kernel[(B,)](part_val, part_idx, tokens, n_splits, SPLITS=triton.next_power_of_2(n_splits),
                             num_warps=1)
    return tokens


def hashed_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (32-bit hash as int64, E) for ``sampler.hashed_exponential``'s inputs; for tests."""
    S = seeds.shape[0]
    h = torch.empty(S, vocab_size, dtype=torch.int64, device=seeds.device)
    e = torch.empty(S, vocab_size, dtype=torch.float32, device=seeds.device)
    _noise_kernel[(S, triton.cdiv(vocab_size, BLOCK))](
        seeds, positions, h, e, vocab_size, INTERPRET=_interpreting(), BLOCK=BLOCK, enable_fp_fusion=False)
    return h, e
