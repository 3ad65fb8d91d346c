"""Token selection for a batch, vectorised over rows.

Order of processing, per row, on float32 copies of the logits:
  1. raw log-probabilities (only if some row asked for ``logprobs``): the
     chosen token's and the top-K alternatives' are read from the logits as
     the model gave them, before everything below;
  2. tokens a row's grammar forbids (structured output: a ``GrammarMask``
     filled on the CPU by ``engine/structured.py``), then suppressed ids (EOS
     and stop tokens while under ``min_tokens``) -> -inf;
  3. repetition penalty (Hugging Face: ``logit < 0 ? logit * p : logit / p``
     over tokens present in the prompt or the output);
  4. presence / frequency penalties (OpenAI: ``logit -= presence * (count > 0)
     + frequency * count``, counts over output tokens);
  5. greedy rows take the argmax here (the stages below leave them untouched);
  6. temperature, then top-k, top-p and min-p, each only on rows that enable it;
  7. sample by an exponential race: ``argmax(probs / E)``, E ~ Exp(1), done as
     ``argmax(logits - log E)``; unlike ``torch.multinomial`` it needs no
     host sync and no normalisation.

Seeded rows draw E from a counter-based hash of (seed, output position, token
id), so a row's tokens depend only on its own seed, prompt and settings, not on
its batch-mates or its row index, and a preempted sequence that is recomputed
resumes the same stream. Unseeded rows draw from the sampler's generator.

Batches that use only temperature and greedy rows (most traffic) are, on CUDA,
sampled by one Triton kernel that reads the logits once (``sampling_kernels``):
the same tokens for greedy and seeded rows; unseeded rows there draw the hashed
noise under a random key taken from the sampler's generator for each call.

Nothing in ``Sampler.__call__`` reads a tensor value on the host: which stages
run is decided by Python flags computed in ``SamplingBatch.build``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..sampling_params import SamplingParams
from . import sampling_kernels
from .step_inputs import ALL_ROWS, kept_rows

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


@dataclass
class SamplingBatch:
    """Per-step sampling settings of B rows, as tensors on the target device."""

    temperature: torch.Tensor  # [B] float32; greedy rows hold 1.0 (``greedy`` marks them)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] int64; vocab_size where disabled
    top_p: torch.Tensor  # [B] float32; +inf where disabled, so cumsum rounding never trims
    min_p: torch.Tensor  # [B] float32; 0 where disabled
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    prompt_mask: Optional[torch.Tensor]  # [B, V] bool, prompt tokens of rows with a repetition penalty
    output_counts: Optional[torch.Tensor]  # [B, V] float32, output token counts of rows with penalties
    suppress: Optional[torch.Tensor]  # [2, N] int64 (row, token id) pairs to mask
    seeded_rows: Optional[torch.Tensor]  # [S] int64, sampled (non-greedy) rows with a seed
    seeds: Optional[torch.Tensor]  # [S] int64
    positions: Optional[torch.Tensor]  # [S] int64, output position of the token being sampled
    seed_slot: Optional[torch.Tensor]  # [B] int64, row -> index into seeds (-1: not seeded); for the fused kernel
    all_greedy: bool
    any_greedy: bool
    any_penalties: bool
    any_suppress: bool
    any_top_k: bool
    max_top_k: int  # largest enabled top_k (0 if none)
    any_top_p: bool
    any_min_p: bool
    any_seeded: bool
    any_unseeded: bool  # some sampled row has no seed
    any_logprobs: bool
    max_logprobs: int  # K alternatives to return (0 if none asked)
    # Set by the runner for steps with constrained rows (structured.GrammarMask); None otherwise.
    grammar_mask: Optional[object] = None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              suppress_ids: list[list[int]], vocab_size: int, device: torch.device,
              num_output_tokens: Optional[list[int]] = None) -> "SamplingBatch":
        """Gather the settings of ``params[i]`` for row i.

        ``prompt_ids`` are only read for rows with a repetition penalty and
        ``output_ids`` for their lengths and for rows with penalties; given
        ``num_output_tokens`` (row i's output length), only for the latter.
        ``suppress_ids[i]`` are masked for row i this step; ids outside the
        vocabulary are ignored (the model can never produce them).
        """
        B, V = len(params), vocab_size
        for name, lists in (("prompt_ids", prompt_ids), ("output_ids", output_ids), ("suppress_ids", suppress_ids)):
            if len(lists) != B:
                raise ValueError(f"{name} has {len(lists)} rows but params has {B}")
        device = torch.device(device)

        def put(values, dtype):
            return _put(values, dtype, device)

        greedy = [p.greedy for p in params]
        sampled = [not g for g in greedy]
        top_k = [min(p.top_k, V) if p.top_k > 0 and s else V for p, s in zip(params, sampled)]
        top_p = [p.top_p if p.top_p < 1.0 and s else float("inf") for p, s in zip(params, sampled)]
        min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
        floats = put([
            [1.0 if g else p.temperature for p, g in zip(params, greedy)],
            top_p,
            min_p,
            [p.repetition_penalty for p in params],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
        ], torch.float32)
        seeded_rows = [i for i, (p, s) in enumerate(zip(params, sampled)) if s and p.seed is not None]
        S = len(seeded_rows)
        slot = [-1] * B if S else []
        for j, i in enumerate(seeded_rows):
            slot[i] = j
        # One host-to-device copy for all per-row integers, split into views.
        ints = put(top_k + [int(g) for g in greedy] + seeded_rows + [params[i].seed for i in seeded_rows]
                   + [num_output_tokens[i] if num_output_tokens is not None else len(output_ids[i])
                      for i in seeded_rows] + slot, torch.int64)
        top_k_t, greedy_t = ints[:B], ints[B:2 * B].bool()
        seeded_t, seeds_t, positions_t = (ints[2 * B + j * S:2 * B + (j + 1) * S] for j in range(3))
        slot_t = ints[2 * B + 3 * S:]

        pen_rows = [p.has_penalties for p in params]
        any_penalties = any(pen_rows)
        prompt_mask = output_counts = None
        if any_penalties:
            rep_rows = [p.repetition_penalty != 1.0 for p in params]
            if any(rep_rows):
                ids = _padded([ids if r else [] for r, ids in zip(rep_rows, prompt_ids)], pad=V)
                prompt_mask = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
                prompt_mask.scatter_(1, put(ids, torch.int64), True)
                prompt_mask = prompt_mask[:, :V]
            ids = put(_padded([ids if r else [] for r, ids in zip(pen_rows, output_ids)], pad=V), torch.int64)
            # The padding column V collects the pad entries and is dropped.
            output_counts = torch.zeros(B, V + 1, dtype=torch.float32, device=device)
            output_counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
            output_counts = output_counts[:, :V]

        pairs = [(i, t) for i, ids in enumerate(suppress_ids) for t in ids if 0 <= t < V]
        suppress = put(pairs, torch.int64).T if pairs else None

        asked = [p.logprobs for p in params if p.logprobs is not None]
        enabled_k = [k for k in top_k if k < V]
        return cls(
            temperature=floats[0], greedy=greedy_t, top_k=top_k_t, top_p=floats[1], min_p=floats[2],
            repetition_penalty=floats[3], presence_penalty=floats[4], frequency_penalty=floats[5],
            prompt_mask=prompt_mask, output_counts=output_counts, suppress=suppress,
            seeded_rows=seeded_t if S else None, seeds=seeds_t if S else None,
            positions=positions_t if S else None, seed_slot=slot_t if S else None,
            all_greedy=all(greedy), any_greedy=any(greedy), any_penalties=any_penalties, any_suppress=bool(pairs),
            any_top_k=bool(enabled_k), max_top_k=max(enabled_k, default=0),
            any_top_p=any(p < 1.0 for p in top_p), any_min_p=any(m > 0.0 for m in min_p),
            any_seeded=bool(seeded_rows),
            any_unseeded=any(s and p.seed is None for p, s in zip(params, sampled)),
            any_logprobs=bool(asked), max_logprobs=max(asked, default=0),
        )


# SamplingBatch's per-row [B] tensors (seed_slot is empty in a batch without seeded rows).
_ROW_FIELDS = ("temperature", "greedy", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")


class SamplingBatchCache:
    """The last step's ``SamplingBatch``, reused while the sampling rows are the same sequences in the same order,
    or those less the ones that finished when every row samples alike and none is seeded.

    A row's settings come from its params, fixed for the request's life, except
    three things that follow its tokens: penalty counts, suppressed ids (under
    ``min_tokens``) and a seeded row's output position. A batch with penalties or
    suppression is built afresh every step; a reused one gets its seeded rows'
    positions re-sent (one small copy). Building costs ~0.6 ms of host time at
    batch 256, and in a steady decode the host has to keep ahead of a ~4 ms GPU step.
    """

    def __init__(self):
        self._seqs: list = []
        self._batch: Optional[SamplingBatch] = None
        self._seeded: list = []  # the sequences of the seeded rows, in ``seeded_rows`` order
        self._uniform = False  # every row of the cached batch has the same sampling settings
        self.reused = 0  # steps served from the cache (tests and benchmarks read it)

    def get(self, seqs: list, suppressed: Callable[[object], list[int]], vocab_size: int,
            device: torch.device) -> SamplingBatch:
        prev = self._batch
        kept = kept_rows(self._seqs, seqs) if prev is not None else None
        if kept is ALL_ROWS:
            self.reused += 1
            positions = prev.positions
            if prev.any_seeded:
                positions = _put([s.num_output_tokens for s in self._seeded], torch.int64, device)
            return dataclasses.replace(prev, positions=positions, grammar_mask=None)
        if kept is not None and self._uniform and not prev.any_seeded:
            # Rows left (finished) from a batch whose rows all sample alike: the others' settings, and
            # every flag, stay as they were.
            self.reused += 1
            idx = _put(kept, torch.int64, device)
            batch = dataclasses.replace(prev, grammar_mask=None, **{
                name: getattr(prev, name).index_select(0, idx) for name in _ROW_FIELDS})
            self._batch, self._seqs = batch, list(seqs)
            return batch
        batch = SamplingBatch.build(
            [s.params for s in seqs],
            # Token lists only for rows with penalties: slicing every row's output costs ~0.3 ms at batch 256.
            [s.prompt_token_ids if s.params.has_penalties else [] for s in seqs],
            [s.output_token_ids if s.params.has_penalties else [] for s in seqs],
            [suppressed(s) for s in seqs],
            vocab_size,
            device,
            num_output_tokens=[s.num_output_tokens for s in seqs],
        )
        reusable = not batch.any_penalties and not batch.any_suppress
        self._uniform = len({(p.greedy, p.top_k, p.top_p, p.min_p, p.seed is None, p.logprobs)
                             for p in (s.params for s in seqs)}) == 1
        self._batch = batch if reusable else None
        self._seqs = list(seqs) if reusable else []
        # The rows ``SamplingBatch.build`` seeds, in row order (read on the host: no device sync).
        self._seeded = [s for s in seqs if not s.params.greedy and s.params.seed is not None] if reusable else []
        return batch


def _put(values, dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _padded(lists: list[list[int]], pad: int) -> list[list[int]]:
    width = max(1, max((len(x) for x in lists), default=0))
    return [list(x) + [pad] * (width - len(x)) for x in lists]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: Optional[torch.Tensor]  # [B] float32, chosen token under the raw distribution; None if no row asked
    top_ids: Optional[torch.Tensor]  # [B, K] int64, best first; None if K == 0
    top_logprobs: Optional[torch.Tensor]  # [B, K] float32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves of c so that
    # no int64 product overflows: the result is exact and identical on every device.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A bijective 32-bit avalanche mix (xorshift-multiply, two rounds), on int64 holding 32-bit values.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def token_hashes(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] int64 holding the 32-bit hash of (seed, position, token id); the fused
    kernel (sampling_kernels.py) computes the same bits."""
    key = _mix32(((seeds >> 32) & _M32) ^ _GOLDEN32)
    key = _mix32(((key ^ (seeds & _M32)) + _GOLDEN32) & _M32)
    key = _mix32(((key ^ (positions & _M32)) + _GOLDEN32) & _M32)
    vocab = _mul32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), _GOLDEN32)
    return _mix32(key[:, None] ^ vocab[None, :])


def hashed_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 Exp(1) noise that depends only on (seed, position, token id)."""
    h = token_hashes(seeds, positions, vocab_size)
    # u in (0, 1) with 2**-32 resolution near 0, where it decides whether a rare
    # token wins the race (E = -log1p(-u) ~ u there); near 1 float32 rounds to 1,
    # so cap it (that only limits E to about 16.6, an event of chance 6e-8).
    u = ((h.to(torch.float32) + 0.5) * 2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return torch.log1p(-u).neg_()


def process_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Float32 logits each row's choice is made from (stages 2-6 of the module
    docstring): greedy rows take their argmax, sampled rows sample their softmax.
    Masked tokens are -inf. Never modifies ``logits``."""
    x = logits.float()
    if b.grammar_mask is not None:
        x = b.grammar_mask.apply(x)
    if b.any_suppress:
        # new_full is a device fill; torch.tensor(-inf, device=cuda) would be a synchronising copy.
        x = x.index_put((b.suppress[0], b.suppress[1]), x.new_full((), float("-inf")))
    if b.any_penalties:
        counts = b.output_counts
        seen = counts > 0
        if b.prompt_mask is not None:
            rep = b.repetition_penalty[:, None]
            penalised = torch.where(x < 0, x * rep, x / rep)
            x = torch.where(b.prompt_mask | seen, penalised, x)
        x = x - b.presence_penalty[:, None] * seen - b.frequency_penalty[:, None] * counts
    if b.all_greedy:
        return x
    x = x / b.temperature[:, None]
    if b.any_top_k or b.any_top_p:
        x = x.masked_fill(x < _truncation_threshold(x, b), float("-inf"))
    if b.any_min_p:
        # probs < min_p * max_prob  <=>  logit < max_logit + log(min_p); min_p = 0 gives -inf: no-op.
        limit = x.amax(dim=-1, keepdim=True) + b.min_p[:, None].log()
        x = x.masked_fill(x < limit, float("-inf"))
    return x


def _truncation_threshold(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    # [B, 1]: the smallest logit that top-k and top-p keep. Kept tokens form a
    # prefix of the sorted row, so one sort (or a top-k) and a gather are enough.
    V = x.shape[-1]
    if b.any_top_p:
        vals = x.sort(dim=-1, descending=True).values
        if b.any_top_k:
            rank = torch.arange(V, device=x.device)
            vals = vals.masked_fill(rank[None, :] >= b.top_k[:, None], float("-inf"))
        probs = vals.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        n_keep = (mass_above < b.top_p[:, None]).sum(dim=-1)  # >= 1: the first token has 0 above it
        n_keep = torch.minimum(n_keep, b.top_k).clamp_(min=1)
        return vals.gather(1, (n_keep - 1)[:, None])
    k = min(b.max_top_k, V)
    vals = x.topk(k, dim=-1).values
    thr = vals.gather(1, (b.top_k.clamp(max=k) - 1)[:, None])
    return torch.where(b.top_k[:, None] < V, thr, float("-inf"))


class Sampler:
    """Picks one token per row; see the module docstring for the stages.

    ``fused`` picks who samples batches that use nothing but temperature and
    greedy rows (no penalties, suppression, top-k, top-p or min-p): None runs
    them through the one-pass Triton kernel of ``sampling_kernels`` on CUDA
    (except all-greedy batches, which stay one ``argmax``), True through the
    kernel on any device whenever eligible (the CPU needs TRITON_INTERPRET=1:
    tests), False never. Seeded and greedy rows get the same tokens either way
    (up to exact ties of rounded scores); unseeded rows draw other random numbers.
    """

    def __init__(self, seed: int = 0, fused: Optional[bool] = None):
        self.seed = seed
        self.fused = fused
        self._generators: dict[str, torch.Generator] = {}
        self._num_sms: dict[str, int] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        b = batch
        if self._use_fused(logits, b):
            # A grammar's mask is applied first (a masked copy; the raw logits stay for logprobs).
            tokens = self._fused(logits if b.grammar_mask is None else b.grammar_mask.apply(logits), b)
        elif b.all_greedy and not b.any_penalties and not b.any_suppress:
            x = logits if b.grammar_mask is None else b.grammar_mask.apply(logits)
            tokens = x.argmax(dim=-1)  # exact in any float dtype: no conversion needed
        else:
            x = process_logits(logits, b)
            if b.all_greedy:
                tokens = x.argmax(dim=-1)
            else:
                tokens = self._race(x, b)
                if b.any_greedy:
                    tokens = torch.where(b.greedy, x.argmax(dim=-1), tokens)
        lp = top_ids = top_lps = None
        if b.any_logprobs:
            raw = logits.float()
            lse = raw.logsumexp(dim=-1, keepdim=True)
            lp = (raw.gather(1, tokens[:, None]) - lse)[:, 0]
            if b.max_logprobs > 0:
                top_vals, top_ids = raw.topk(min(b.max_logprobs, raw.shape[-1]), dim=-1)
                top_lps = top_vals - lse
        return SamplerOutput(tokens, lp, top_ids, top_lps)

    def _use_fused(self, logits: torch.Tensor, b: SamplingBatch) -> bool:
        if self.fused is False or b.any_penalties or b.any_suppress or b.any_top_k or b.any_top_p or b.any_min_p:
            return False
        if self.fused is None:
            return logits.is_cuda and not b.all_greedy and sampling_kernels.available()
        return True

    def _fused(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        device = logits.device
        step_key = None
        if b.any_unseeded:
            # Drawn on the device: keys this call's unseeded rows without a host sync.
            step_key = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device,
                                     generator=self._generator(device))
        key = str(device)
        if key not in self._num_sms:
            self._num_sms[key] = (torch.cuda.get_device_properties(device).multi_processor_count
                                  if device.type == "cuda" else 1)
        splits = sampling_kernels.default_splits(logits.shape[0], logits.shape[-1], self._num_sms[key])
        return sampling_kernels.fused_sample(logits, b.temperature, b.greedy if b.any_greedy else None,
                                             b.seed_slot, b.seeds, b.positions, step_key, splits)

    def _race(self, x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.any_unseeded:
            noise = torch.empty_like(x).exponential_(generator=self._generator(x.device))
        else:
            noise = torch.ones_like(x)
        if b.any_seeded:
            noise.index_copy_(0, b.seeded_rows, hashed_exponential(b.seeds, b.positions, x.shape[-1]))
        # E = 0 would give log E = -inf and turn a masked token's -inf into NaN, which argmax prefers.
        gumbel = noise.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()
        return (x + gumbel).argmax(dim=-1)
