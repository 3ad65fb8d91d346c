"""How close two engines' next-token distributions are: mean KL divergence and top-1 agreement.

The reference engine decodes greedily; both engines are then fed the
reference's tokens (teacher forcing), so at every step both predict the
next token from the same context, and one early disagreement does not make
every later step incomparable.

``decode=True`` runs the forced tokens as the engine serves them: the
prompts prefilled in one step through the paged KV cache, then one batched
decode step per token that reads the cache (CUDA graphs on the GPU), so an
fp8 KV cache and the decode kernels are exercised. ``decode=False`` runs
prompt and forced tokens as one prefill step per call (the same logits up to
rounding, much cheaper on the CPU).

The engines must be single-process (tensor_parallel_size 1), and their KV
caches are overwritten: use engines that serve nothing else (their prefix
cache is no longer valid afterwards), with ``num_kv_blocks`` >= prompts x
blocks per (prompt + steps).

    kl, top1 = logit_agreement(ref_engine, fp8_engine, prompts, steps=32)
"""
from __future__ import annotations

import types

import torch

from pagedbatch import SamplingParams
from pagedbatch.engine.attention.metadata import AttentionMetadata


def _runner(engine):
    inner = getattr(engine, "engine", engine)  # InferenceEngine or LLMEngine
    runner = inner.runner
    if runner.tp is not None:
        raise ValueError("logit_agreement needs a single-process engine (tensor_parallel_size 1)")
    return runner


def greedy_tokens(engine, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """[n, steps]: the engine's greedy continuation of each prompt (EOS ignored)."""
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return torch.tensor([o.token_ids for o in outs])


@torch.inference_mode()
def forced_logits(engine, prompts: list[list[int]], tokens: torch.Tensor, decode: bool = True) -> torch.Tensor:
    """[n, steps, vocab] float32 on the CPU: the logits predicting ``tokens[:, t]`` after prompt + ``tokens[:, :t]``."""
    runner = _runner(engine)
    dev, bs, n, steps = runner.device, runner.block_size, len(prompts), tokens.shape[1]
    per = -(-max(len(p) + steps for p in prompts) // bs)
    if n * per > runner.num_blocks:
        raise ValueError(f"the engine's cache has {runner.num_blocks} blocks; {n} prompts need {n * per}")
    tables = torch.arange(n * per, dtype=torch.int32).view(n, per)

    def run(ids: list[list[int]], seq_lens: list[int], keep: int) -> torch.Tensor:
        """One step: ``ids[i]`` are the last tokens of sequence i; logits of its last ``keep`` of them."""
        q_lens = [len(x) for x in ids]
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        pos = [p for i, q in enumerate(q_lens) for p in range(seq_lens[i] - q, seq_lens[i])]
        owner = [i for i, q in enumerate(q_lens) for _ in range(q)]
        slots = [int(tables[i, p // bs]) * bs + p % bs for i, p in zip(owner, pos)]
        meta = AttentionMetadata(
            positions=torch.tensor(pos, device=dev), slot_mapping=torch.tensor(slots, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_tables=tables.to(dev),
            num_seqs=n, num_tokens=qsl[-1], max_query_len=max(q_lens), max_seq_len=max(seq_lens))
        flat = torch.tensor([t for x in ids for t in x], device=dev)
        ips = lambda: torch.stack((flat, meta.positions, meta.slot_mapping))  # noqa: E731 (no packed step buffer)
        hidden = runner._forward(types.SimpleNamespace(input_ids=flat, meta=meta, ids_positions_slots=ips))
        rows = torch.tensor([e - keep + j for e in qsl[1:] for j in range(keep)], device=dev)
        return runner._logits(hidden.index_select(0, rows)).float().view(n, keep, -1).cpu()

    forced = tokens.tolist()
    lens = [len(p) for p in prompts]
    if not decode:
        return run([p + f[:-1] for p, f in zip(prompts, forced)], [L + steps - 1 for L in lens], steps)
    logits = [run(prompts, lens, 1)]
    for t in range(steps - 1):
        logits.append(run([[f[t]] for f in forced], [L + t + 1 for L in lens], 1))
    return torch.cat(logits, 1)


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || other) over all positions, and the fraction of positions whose argmax agrees."""
    p = ref_logits.double().log_softmax(-1)
    q = logits.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return kl, top1


def logit_agreement(ref_engine, engine, prompts: list[list[int]], steps: int = 32,
                    decode: bool = True) -> tuple[float, float]:
    """(mean KL divergence, top-1 agreement) of ``engine``'s next-token distributions against ``ref_engine``'s."""
    tokens = greedy_tokens(ref_engine, prompts, steps)
    ref = forced_logits(ref_engine, prompts, tokens, decode)
    return kl_and_top1(ref, forced_logits(engine, prompts, tokens, decode))
