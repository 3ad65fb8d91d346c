"""Token selection for a batch, vectorised over rows.

Order of processing, per row, on float32 logits:
  1. raw log-probabilities (for ``logprobs``), before anything below;
  2. suppressed ids (EOS / stop tokens under ``min_tokens``) -> -inf;
  3. repetition penalty (Hugging Face: prompt + output tokens),
     presence / frequency penalties (OpenAI: output tokens);
  4. greedy rows take the argmax here;
  5. temperature, top-k, top-p, min-p;
  6. sample by an exponential race: argmax(log p - log E), E ~ Exp(1).

Seeded rows draw E from a counter-based hash of (seed, output position,
token id), so a row's tokens depend only on its own seed and prompt, not on
its batch-mates, and a preempted sequence resumes the same stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..sampling_params import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    temperature: Optional[torch.Tensor]  # [B] float32, 1.0 for greedy rows (unused there)
    greedy: Optional[torch.Tensor]  # [B] bool
    top_k: Optional[torch.Tensor]  # [B] int64, V where disabled
    top_p: Optional[torch.Tensor]  # [B] float32
    min_p: Optional[torch.Tensor]  # [B] float32
    rep_penalty: Optional[torch.Tensor]  # [B, 1]
    presence: Optional[torch.Tensor]  # [B, 1]
    frequency: Optional[torch.Tensor]  # [B, 1]
    prompt_mask: Optional[torch.Tensor]  # [B, V] bool, tokens in the prompt
    output_counts: Optional[torch.Tensor]  # [B, V] float32
    suppress: Optional[tuple[torch.Tensor, torch.Tensor]]  # (rows, ids)
    seeds: Optional[torch.Tensor]  # [B] int64 (0 for unseeded rows)
    positions: Optional[torch.Tensor]  # [B] int64, output position of the token being sampled
    seeded: Optional[torch.Tensor]  # [B] bool
    all_greedy: bool
    any_random: bool
    any_seeded: bool
    any_unseeded: bool
    max_logprobs: int  # -1: no row asked for logprobs

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              suppress_ids: list[list[int]], vocab_size: int, device: torch.device) -> "SamplingBatch":
        B = len(params)

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        random_rows = [p for p in params if not p.greedy]
        any_pen = any(p.has_penalties for p in params)
        prompt_mask = output_counts = rep = pres = freq = None
        if any_pen:
            rep = t([[p.repetition_penalty] for p in params], torch.float32)
            pres = t([[p.presence_penalty] for p in params], torch.float32)
            freq = t([[p.frequency_penalty] for p in params], torch.float32)
            prompt_mask = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            rows, cols = _flatten([ids if p.repetition_penalty != 1.0 else [] for p, ids in zip(params, prompt_ids)])
            if cols:
                prompt_mask[t(rows, torch.int64), t(cols, torch.int64)] = True
            output_counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
            rows, cols = _flatten([ids if p.has_penalties else [] for p, ids in zip(params, output_ids)])
            if cols:
                output_counts.index_put_((t(rows, torch.int64), t(cols, torch.int64)),
                                         torch.ones(len(cols), device=device), accumulate=True)
        rows, cols = _flatten(suppress_ids)
        suppress = (t(rows, torch.int64), t(cols, torch.int64)) if cols else None
        any_seeded = any(p.seed is not None for p in random_rows)
        return cls(
            temperature=None if all_greedy else t([p.temperature if not p.greedy else 1.0 for p in params], torch.float32),
            greedy=None if all_greedy or not any(greedy) else t(greedy, torch.bool),
            top_k=t([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
            if any(p.top_k > 0 for p in random_rows) else None,
            top_p=t([p.top_p for p in params], torch.float32) if any(p.top_p < 1 for p in random_rows) else None,
            min_p=t([p.min_p for p in params], torch.float32) if any(p.min_p > 0 for p in random_rows) else None,
            rep_penalty=rep, presence=pres, frequency=freq, prompt_mask=prompt_mask, output_counts=output_counts,
            suppress=suppress,
            seeds=t([p.seed or 0 for p in params], torch.int64) if any_seeded else None,
            positions=t([len(o) for o in output_ids], torch.int64) if any_seeded else None,
            seeded=t([p.seed is not None for p in params], torch.bool) if any_seeded else None,
            all_greedy=all_greedy, any_random=bool(random_rows), any_seeded=any_seeded,
            any_unseeded=any(p.seed is None for p in random_rows),
            max_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )


def _flatten(lists: list[list[int]]) -> tuple[list[int], list[int]]:
    rows, cols = [], []
    for i, ids in enumerate(lists):
        rows.extend([i] * len(ids))
        cols.extend(ids)
    return rows, cols


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: Optional[torch.Tensor]  # [B] float32, chosen token under the raw distribution
    top_ids: Optional[torch.Tensor]  # [B, K] int64, best first
    top_logprobs: Optional[torch.Tensor]  # [B, K] float32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash on int64 tensors; products stay below 2**59, so no overflow.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def hashed_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] Exp(1) noise that depends only on (seed, position, token id)."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32))
    key = _mix32(key ^ _mix32(positions & _M32))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix32(key[:, None] ^ vocab[None, :])
    h = _mix32((h + 0x9E3779B9) & _M32)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(u)


class Sampler:
    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        lp = top_ids = top_lps = None
        raw_logprobs = None
        if b.max_logprobs >= 0:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            if b.max_logprobs > 0:
                top_lps, top_ids = raw_logprobs.topk(b.max_logprobs, dim=-1)
        if b.suppress is not None:
            logits = logits.index_put((b.suppress[0], b.suppress[1]), torch.tensor(float("-inf"), device=logits.device))
        if b.output_counts is not None:
            seen = b.prompt_mask | (b.output_counts > 0)
            penalised = torch.where(logits < 0, logits * b.rep_penalty, logits / b.rep_penalty)
            logits = torch.where(seen, penalised, logits)
            logits = logits - b.presence * (b.output_counts > 0) - b.frequency * b.output_counts
        greedy_tokens = logits.argmax(dim=-1)
        if b.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = self._sample(logits, b)
            if b.greedy is not None:
                tokens = torch.where(b.greedy, greedy_tokens, tokens)
        if raw_logprobs is not None:
            lp = raw_logprobs.gather(1, tokens[:, None])[:, 0]
        return SamplerOutput(tokens, lp, top_ids, top_lps)

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        V = logits.shape[-1]
        logits = logits / b.temperature[:, None]
        if b.top_k is not None or b.top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if b.top_k is not None:
                rank = torch.arange(V, device=logits.device)[None, :]
                remove |= rank >= b.top_k[:, None]
                sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            if b.top_p is not None:
                probs = sorted_logits.softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
                remove |= before >= b.top_p[:, None]  # the first token always stays
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
        if b.min_p is not None:
            probs = logits.softmax(dim=-1)
            limit = b.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < limit, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        if b.any_seeded:
            noise = hashed_exponential(b.seeds, b.positions, V)
            if b.any_unseeded:
                rand = torch.empty_like(logp).exponential_(generator=self._generator(logp.device))
                noise = torch.where(b.seeded[:, None], noise, rand)
        else:
            noise = torch.empty_like(logp).exponential_(generator=self._generator(logp.device))
        return (logp - noise.log()).argmax(dim=-1)
