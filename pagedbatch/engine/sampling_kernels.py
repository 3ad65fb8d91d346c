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
each row's best chunk.

Exact scores cost ~90 instructions per logit (IEEE division, libdevice log1p
and log; SASS for sm_90): at batch 256 that, not memory, would bound the
kernel. So each tile is first scored cheaply (~42 instructions: multiply by
1/T, the hardware log2, a series for small E) with a proven error bound
(``_gumbel_approx``); only a tile whose cheap best comes within the slack of
the exact best so far is scored exactly. That is a handful of tiles per row,
and it changes no token: every exact score in a skipped tile is at most the
best one already found, and a later id that only ties it loses.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import pdl

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from .pdl import wait_for_producer
except ImportError:  # the torch sampler needs no Triton
    triton = None

BLOCK = 2048  # logits per program per loop iteration: 8 per thread at 8 warps (16-byte bf16 loads)
NUM_WARPS = 8
# |cheap score - exact score| <= 2.5e-5 + 3e-7 |score|: G as in _gumbel_approx, x * (1 / T) against
# x / T 1.5 ulps, the sums' roundings 1 ulp. A tile is skipped only when its cheap best is below the
# exact best so far by more than 2**-10 + 2**-19 |best|: ~40x and ~6x those terms.
SLACK_ABS = 2.0**-10
SLACK_REL = 2.0**-19


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
    def _u_of_hash(h):
        # sampler.hashed_exponential's u in (0, 1), operation for operation.
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2**-32
        return tl.minimum(u, 0.99999994039535522)  # 1 - 2**-24

    @triton.jit
    def _uniform(key, token):
        # (hash, u) of a row's tokens.
        h = key ^ (token.to(tl.uint32) * 0x9E3779B9)
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        return h, _u_of_hash(h)

    @triton.jit
    def _gumbel_exact(u, INTERPRET: tl.constexpr):
        # (E, G) as the torch path computes them: E = -log1p(-u), G = -log(max(E, tiny)).
        if INTERPRET:
            # No libdevice in the interpreter: float64 log1p (Kahan's form) and log, each rounded once.
            w = 1.0 - u.to(tl.float64)
            e = (tl.log(w) * u.to(tl.float64) / (w - 1.0)).to(tl.float32)
            g = -(tl.log(tl.maximum(e, 1.1754943508222875e-38).to(tl.float64)).to(tl.float32))
        else:
            e = -libdevice.log1p(-u)
            g = -libdevice.log(tl.maximum(e, 1.1754943508222875e-38))
        return e, g

    @triton.jit
    def _lg2_approx(v, INTERPRET: tl.constexpr):
        # The hardware log2 (MUFU.LG2, absolute error <= 2**-22.6 per the PTX ISA); tl.log2 compiles
        # to an accurate software routine three times the cost.
        if INTERPRET:
            lg = tl.log2(v)
        else:
            lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                           is_pure=True, pack=1)
        return lg

    @triton.jit
    def _gumbel_approx(u, INTERPRET: tl.constexpr):
        # G to within 1.5e-5, cheaply. E = -ln(1 - u): for u >= 2**-6, 1 - u rounds by <= 2**-24 and
        # lg2 errs by <= 1.1e-7 in ln units, so E is off by <= 1.1e-5 relative (E >= 0.0155); below,
        # the series u + u^2/2 + u^3/3 is off by <= u^3/4 < 1e-6 relative. G = -ln E then adds
        # 1.1e-7 and a rounding of 1.4e-6 (G <= 23), and the exact G is itself within 2e-6.
        series = u * (1.0 + u * (0.5 + u * 0.33333334))
        e = tl.where(u < 0.015625, series, -_lg2_approx(1.0 - u, INTERPRET) * 0.69314718)
        return -_lg2_approx(e, INTERPRET) * 0.69314718

    @triton.jit
    def _scan_greedy(base, lo, hi, BLOCK: tl.constexpr):
        # Per lane: the largest logit and its (first) id over the chunk [lo, hi).
        lanes = tl.arange(0, BLOCK)
        best_val = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lo + lanes  # an all -inf chunk answers its first id, like torch.argmax
        for start in range(lo, hi, BLOCK):
            offs = start + lanes
            x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
            x = tl.where(x != x, float("inf"), x)  # a NaN wins, as in torch.argmax
            better = x > best_val
            best_val = tl.where(better, x, best_val)
            best_idx = tl.where(better, offs, best_idx)
        return best_val, best_idx

    @triton.jit
    def _scan_sampled(base, lo, hi, row, TEMP, SLOT, SEEDS, POSITIONS, STEP_KEY, ANY_SEEDED: tl.constexpr,
                      ANY_UNSEEDED: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
                      SLACK_ABS: tl.constexpr, SLACK_REL: tl.constexpr):
        # Per lane: the largest logit / T + G and its (first) id over the chunk [lo, hi).
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
        lanes = tl.arange(0, BLOCK)
        best_val = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lo + lanes
        inv_t = tl.math.div_rn(1.0, temp)
        top = tl.full([], float("-inf"), tl.float32)  # the best exact score so far
        for start in range(lo, hi, BLOCK):
            offs = start + lanes
            x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
            x = tl.where(x != x, float("inf"), x)  # a NaN wins, as in torch.argmax
            _h, u = _uniform(key, offs)
            cheap = x * inv_t + _gumbel_approx(u, INTERPRET)
            # |top| capped so that an infinite best gives no inf - inf.
            if tl.max(cheap, 0) + (SLACK_ABS + SLACK_REL * tl.minimum(tl.abs(top), 3.0e38)) > top:
                # torch divides with IEEE rounding (Triton's "/" does not).
                _e, g = _gumbel_exact(u, INTERPRET)
                score = tl.math.div_rn(x, temp) + g
                better = score > best_val  # strict: within a lane the first id keeps a tie
                best_val = tl.where(better, score, best_val)
                best_idx = tl.where(better, offs, best_idx)
                top = tl.max(best_val, 0)
        return best_val, best_idx

    # Sizes that change with the batch are not specialized on (divisibility by 16, == 1): every new
    # combination would be one more compile (~0.5 s) in the middle of a job.
    @triton.jit(do_not_specialize=["chunk", "n_splits"])
    def _sample_kernel(
        LOGITS, stride_row, TEMP, GREEDY, SLOT, SEEDS, POSITIONS, STEP_KEY,
        PART_VAL, PART_IDX, TOKENS, V, chunk, n_splits,
        ANY_GREEDY: tl.constexpr, ANY_SAMPLED: tl.constexpr, ANY_SEEDED: tl.constexpr, ANY_UNSEEDED: tl.constexpr,
        SINGLE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr, SLACK_ABS: tl.constexpr,
        SLACK_REL: tl.constexpr, PDL: tl.constexpr = False,
    ):
        wait_for_producer(PDL)
        row = tl.program_id(0)
        split = tl.program_id(1)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, V)
        base = LOGITS + row.to(tl.int64) * stride_row
        # Static unless the batch mixes greedy and sampled rows: the compiler only sees scans whose
        # inputs exist (the sampled scan reads seeds or the step key).
        if not ANY_SAMPLED:
            best_val, best_idx = _scan_greedy(base, lo, hi, BLOCK)
        elif not ANY_GREEDY:
            best_val, best_idx = _scan_sampled(base, lo, hi, row, TEMP, SLOT, SEEDS, POSITIONS, STEP_KEY,
                                               ANY_SEEDED, ANY_UNSEEDED, INTERPRET, BLOCK, SLACK_ABS, SLACK_REL)
        elif tl.load(GREEDY + row) != 0:
            best_val, best_idx = _scan_greedy(base, lo, hi, BLOCK)
        else:
            best_val, best_idx = _scan_sampled(base, lo, hi, row, TEMP, SLOT, SEEDS, POSITIONS, STEP_KEY,
                                               ANY_SEEDED, ANY_UNSEEDED, INTERPRET, BLOCK, SLACK_ABS, SLACK_REL)
        # The chunk's best: the largest score, the lowest id among lanes holding it.
        val = tl.max(best_val, 0)
        idx = tl.min(tl.where(best_val == val, best_idx, 2147483647), 0)
        if SINGLE:
            tl.store(TOKENS + row, idx.to(tl.int64))
        else:
            tl.store(PART_VAL + row * n_splits + split, val)
            tl.store(PART_IDX + row * n_splits + split, idx)

    @triton.jit(do_not_specialize=["n_splits"])
    def _reduce_kernel(PART_VAL, PART_IDX, TOKENS, n_splits, SPLITS: tl.constexpr,
                       PDL: tl.constexpr = False):
        wait_for_producer(PDL)
        row = tl.program_id(0)
        o = tl.arange(0, SPLITS)
        m = o < n_splits
        val = tl.load(PART_VAL + row * n_splits + o, mask=m, other=float("-inf"))
        idx = tl.load(PART_IDX + row * n_splits + o, mask=m, other=2147483647)
        tok = tl.min(tl.where(val == tl.max(val, 0), idx, 2147483647), 0)  # splits are in id order
        tl.store(TOKENS + row, tok.to(tl.int64))

    # Test hooks: the noise the sampling kernel uses, for sampler.hashed_exponential's inputs, and
    # the exact and cheap G for given hashes.

    @triton.jit
    def _noise_kernel(SEEDS, POSITIONS, HASH, NOISE, V, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        h, u = _uniform(_row_key(tl.load(SEEDS + row), tl.load(POSITIONS + row)), offs)
        e, _ = _gumbel_exact(u, INTERPRET)
        tl.store(HASH + row * V + offs, h.to(tl.int64), mask=m)
        tl.store(NOISE + row * V + offs, e, mask=m)

    @triton.jit
    def _gumbel_kernel(HASH, G, G_APPROX, N, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        u = _u_of_hash(tl.load(HASH + offs, mask=m, other=0).to(tl.uint32))
        _, g = _gumbel_exact(u, INTERPRET)
        tl.store(G + offs, g, mask=m)
        tl.store(G_APPROX + offs, _gumbel_approx(u, INTERPRET), mask=m)


def _interpreting() -> bool:
    # TRITON_INTERPRET=1 turns triton.jit into the interpreter's wrapper; it has no libdevice.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sample_kernel, InterpretedFunction)


MAX_SPLITS = 64  # the reduce kernel's fixed width: one compiled variant for every batch size


def default_splits(batch: int, vocab: int, num_sms: int) -> int:
    """Chunks per row: enough programs for ~4 per SM (one wave at 8 warps each), at least a tile each.

    At least 2 whenever the vocabulary spans two tiles, so whether the reduce kernel runs (the
    kernel's SINGLE) depends on the model alone, never on the batch size: a job whose batch grows
    past a threshold would otherwise compile a new variant mid-run.
    """
    tiles = -(-vocab // BLOCK)
    want = -(-4 * num_sms // max(batch, 1))
    return max(min(2, tiles), min(want, tiles, MAX_SPLITS))


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
    # Rounding as in torch's separate kernels: no fp contraction (an FMA of log's last multiply
    # with the "+ x / T" would round once instead of twice), and libdevice without flush-to-zero
    # (Triton's default flushes denormals; torch's CUDA build does not).
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
        SINGLE=single, INTERPRET=_interpreting(), BLOCK=block, SLACK_ABS=SLACK_ABS,
        SLACK_REL=SLACK_REL, num_warps=num_warps,
        enable_fp_fusion=False, enable_reflect_ftz=False, **pdl.launch_kwargs(logits.device))
    if not single:
        _reduce_kernel[(B,)](part_val, part_idx, tokens, n_splits, SPLITS=max(MAX_SPLITS, triton.next_power_of_2(n_splits)),
                             num_warps=1, **pdl.launch_kwargs(logits.device))
    return tokens


def hashed_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (32-bit hash as int64, E) for ``sampler.hashed_exponential``'s inputs; for tests."""
    S = seeds.shape[0]
    h = torch.empty(S, vocab_size, dtype=torch.int64, device=seeds.device)
    e = torch.empty(S, vocab_size, dtype=torch.float32, device=seeds.device)
    _noise_kernel[(S, triton.cdiv(vocab_size, BLOCK))](
        seeds, positions, h, e, vocab_size, INTERPRET=_interpreting(), BLOCK=BLOCK, enable_fp_fusion=False,
        enable_reflect_ftz=False)
    return h, e


def gumbel_pair(hashes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact G, cheap G) for int64 ``hashes`` holding 32-bit values; for tests of the skip bound."""
    g = torch.empty(hashes.shape, dtype=torch.float32, device=hashes.device)
    ga = torch.empty_like(g)
    _gumbel_kernel[(triton.cdiv(hashes.numel(), BLOCK),)](
        hashes, g, ga, hashes.numel(), INTERPRET=_interpreting(), BLOCK=BLOCK, enable_fp_fusion=False,
        enable_reflect_ftz=False)
    return g, ga
