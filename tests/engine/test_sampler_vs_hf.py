"""The sampler's penalties and truncation agree with transformers' logits processors."""
import math

import pytest
import torch

from pagedbatch.engine.sampler import Sampler, SamplingBatch, hashed_exponential
from pagedbatch.sampling_params import SamplingParams

V = 50


def batch(params, prompt_ids=None, output_ids=None, suppress=None):
    B = len(params)
    return SamplingBatch.build(params, prompt_ids or [[] for _ in range(B)], output_ids or [[] for _ in range(B)],
                               suppress or [[] for _ in range(B)], V, torch.device("cpu"))


def logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_hf_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(2)
    prompt, out = [[1, 2, 3], [4, 5]], [[3, 7, 7], [9]]
    p = SamplingParams(temperature=0, repetition_penalty=1.7)
    ours = batch([p, p], prompt, out)
    greedy = Sampler()(x, ours).token_ids
    seen = torch.tensor([pp + o for pp, o in zip(prompt, out)][0])[None]
    hf0 = RepetitionPenaltyLogitsProcessor(1.7)(seen, x[:1].clone())
    seen1 = torch.tensor(prompt[1] + out[1])[None]
    hf1 = RepetitionPenaltyLogitsProcessor(1.7)(seen1, x[1:].clone())
    assert greedy.tolist() == [hf0.argmax().item(), hf1.argmax().item()]
    # Compare the penalised logits themselves through the sampler's internals.
    b = ours
    got = torch.where(b.prompt_mask | (b.output_counts > 0),
                      torch.where(x < 0, x * 1.7, x / 1.7), x)
    assert torch.allclose(got, torch.cat([hf0, hf1]))


def test_presence_and_frequency_follow_openai_formula():
    x = logits(1)
    out = [[3, 3, 3, 8]]
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.5)
    b = batch([p], [[3]], out)
    expected = x.clone()
    expected[0, 3] -= 0.5 + 1.5 * 3
    expected[0, 8] -= 0.5 + 1.5 * 1
    assert Sampler()(x, b).token_ids.item() == expected.argmax().item()
    big = x.clone()
    big[0, 3] = 100.0  # would win without penalties; 100 - 5 still wins, so make the penalty matter
    p2 = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert Sampler()(big, batch([p2], [[]], [[3] * 60])).token_ids.item() != 3


@pytest.mark.parametrize("kw, hf_name, hf_kw", [
    (dict(top_k=5), "TopKLogitsWarper", dict(top_k=5)),
    (dict(top_p=0.7), "TopPLogitsWarper", dict(top_p=0.7)),
    (dict(min_p=0.1), "MinPLogitsWarper", dict(min_p=0.1)),
])
def test_truncation_keeps_the_same_tokens_as_hf_warpers(kw, hf_name, hf_kw):
    import transformers

    x = logits(3)
    warper = getattr(transformers, hf_name)(**hf_kw)
    hf_keep = torch.isfinite(warper(torch.zeros(3, 1, dtype=torch.long), x.clone()))
    p = SamplingParams(temperature=1.0, **kw)
    b = batch([p] * 3)
    # Draw many samples: every chosen token must be in HF's kept set, and every kept token must appear.
    s = Sampler(seed=1)
    seen = torch.zeros(3, V, dtype=torch.bool)
    for _ in range(400):
        t = s(x, b).token_ids
        seen[torch.arange(3), t] = True
    assert not (seen & ~hf_keep).any()
    likely = hf_keep & (x.softmax(-1) > 0.02)
    assert (seen | ~likely).all()


def test_suppressed_ids_are_never_chosen_and_greedy_is_argmax():
    x = logits(2)
    top = x.argmax(-1).tolist()
    b = batch([SamplingParams(temperature=0)] * 2, suppress=[[top[0]], []])
    got = Sampler()(x, b).token_ids.tolist()
    assert got[0] != top[0] and got[1] == top[1]


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    x = logits(2)
    b = batch([SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0)] * 2, [[1], [2]], [[], []])
    out = Sampler()(x, b)
    raw = x.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids, raw.topk(3).indices)


def test_seeded_row_is_independent_of_batch_mates_and_position():
    x = logits(16, seed=3)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    alone = Sampler(seed=5)(x[7:8], batch([seeded], output_ids=[[1] * 4])).token_ids.item()
    others = [SamplingParams(temperature=1.0, top_k=3) for _ in range(16)]
    others[7] = seeded
    outs = [[0] * 9 for _ in range(16)]
    outs[7] = [1] * 4
    inside = Sampler(seed=9)(x, batch(others, output_ids=outs)).token_ids[7].item()
    assert inside == alone


def test_hashed_noise_is_exponential():
    e = hashed_exponential(torch.tensor([7, 8]), torch.tensor([0, 1]), 20000)
    assert abs(e.mean().item() - 1.0) < 0.03 and abs(e.var().item() - 1.0) < 0.08
    assert not torch.equal(e[0], e[1])


def test_seeded_sampling_distribution_matches_softmax():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = (x / 0.7).softmax(-1)[0]
    counts = torch.zeros(4)
    s = Sampler()
    for pos in range(3000):
        b = SamplingBatch.build([SamplingParams(temperature=0.7, seed=11)], [[]], [[0] * pos], [[]], 4,
                                torch.device("cpu"))
        counts[s(x, b).token_ids.item()] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, probs, atol=0.03), (freq, probs)
    assert math.isclose(freq.sum().item(), 1.0)
