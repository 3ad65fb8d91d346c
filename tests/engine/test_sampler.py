"""The sampler: penalties and truncation as in transformers, logprobs, suppression,
and sampling noise that has the right distribution and, for seeded rows, depends
on nothing but (seed, output position)."""
import pytest
import torch

from pagedbatch.engine.sampler import Sampler, SamplingBatch, hashed_exponential, process_logits
from pagedbatch.sampling_params import SamplingParams

V = 64
CPU = torch.device("cpu")


def build(params, prompt_ids=None, output_ids=None, suppress=None, vocab=V, device=CPU):
    B = len(params)
    return SamplingBatch.build(params, prompt_ids or [[] for _ in range(B)], output_ids or [[] for _ in range(B)],
                               suppress or [[] for _ in range(B)], vocab, device)


def random_logits(B, vocab=V, seed=0, scale=3.0):
    return torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


# Critical values of chi-square at p = 0.001 for small degrees of freedom.
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


# --- penalties ---------------------------------------------------------------------------------------------

def test_repetition_penalty_matches_hf_processor_and_spares_other_rows():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = random_logits(3)
    prompts = [[1, 2, 3, 40], [4, 5], [1, 2, 3]]
    outputs = [[3, 7, 7, 50], [9], [7, 8]]
    params = [SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0, repetition_penalty=0.6),
              SamplingParams(temperature=0)]
    got = process_logits(x, build(params, prompts, outputs))
    for row, penalty in ((0, 1.7), (1, 0.6)):
        seen = torch.tensor(prompts[row] + outputs[row])[None]
        hf = RepetitionPenaltyLogitsProcessor(penalty)(seen, x[row:row + 1].clone())
        torch.testing.assert_close(got[row:row + 1], hf, rtol=0, atol=0)
    assert torch.equal(got[2], x[2])


def test_presence_and_frequency_follow_openai_formula_over_output_tokens_only():
    x = random_logits(2)
    prompts, outputs = [[3, 11], [5]], [[3, 3, 3, 8], [5, 5]]
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.5),
              SamplingParams(temperature=0, presence_penalty=-0.25)]
    got = process_logits(x, build(params, prompts, outputs))
    expected = x.clone()
    for row, (presence, frequency) in enumerate(((0.5, 1.5), (-0.25, 0.0))):
        for token in set(outputs[row]):
            expected[row, token] -= presence + frequency * outputs[row].count(token)
    torch.testing.assert_close(got, expected)
    assert got[0, 11] == x[0, 11]  # prompt-only tokens are not penalised by presence/frequency


def test_all_penalties_combine_in_documented_order():
    x = random_logits(1)
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(x, build([p], [[1]], [[2, 2]]))
    expected = x.clone()
    for t in (1, 2):
        expected[0, t] = expected[0, t] * 2.0 if expected[0, t] < 0 else expected[0, t] / 2.0
    expected[0, 2] -= 0.5 + 0.25 * 2
    torch.testing.assert_close(got, expected)


# --- temperature and truncation against transformers' warpers ------------------------------------------------

def hf_chain(x, temperature, top_k=0, top_p=1.0, min_p=0.0):
    import transformers

    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    x = transformers.TemperatureLogitsWarper(temperature)(ids, x.clone())
    if top_k:
        x = transformers.TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1.0:
        x = transformers.TopPLogitsWarper(top_p)(ids, x)
    if min_p:
        x = transformers.MinPLogitsWarper(min_p)(ids, x)
    return x


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=0.5, min_p=0.05),
    dict(temperature=0.9, top_k=10, top_p=0.8, min_p=0.02),
    dict(temperature=2.0, top_k=1),
])
def test_temperature_and_truncation_match_hf_warpers(kw):
    x = random_logits(4, seed=1)
    got = process_logits(x, build([SamplingParams(**kw)] * 4))
    hf = hf_chain(x, **kw)
    assert torch.equal(torch.isfinite(got), torch.isfinite(hf))
    torch.testing.assert_close(got.softmax(-1), hf.softmax(-1))


def test_top_k_keeps_ties_like_hf():
    x = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    got = process_logits(x, build([SamplingParams(top_k=2)], vocab=6))
    hf = hf_chain(x, 1.0, top_k=2)
    assert torch.equal(torch.isfinite(got), torch.isfinite(hf))


def test_rows_with_different_settings_do_not_affect_each_other():
    x = random_logits(5, seed=2)
    params = [SamplingParams(top_k=4, seed=1), SamplingParams(top_p=0.5, seed=2), SamplingParams(temperature=0),
              SamplingParams(min_p=0.2, temperature=0.8, seed=3), SamplingParams(temperature=1.1, seed=4)]
    outputs = [[1] * i for i in range(5)]
    together = process_logits(x, build(params, output_ids=outputs))
    tokens = Sampler(seed=7)(x, build(params, output_ids=outputs)).token_ids
    for i, p in enumerate(params):
        alone_batch = build([p], output_ids=[outputs[i]])
        assert torch.equal(process_logits(x[i:i + 1], alone_batch), together[i:i + 1]), i
        assert Sampler(seed=99)(x[i:i + 1], alone_batch).token_ids.item() == tokens[i].item(), i
    # Rows that enable nothing are only divided by their temperature.
    assert torch.equal(together[4], x[4] / 1.1)
    assert torch.isfinite(together[3]).sum() < V and torch.isfinite(together[0]).sum() == 4


def test_top_p_one_row_next_to_top_p_row_is_untouched_even_on_a_long_flat_tail():
    x = torch.zeros(2, 50000)
    x[:, 0] = 12.0
    got = process_logits(x, build([SamplingParams(top_p=0.5), SamplingParams()], vocab=50000))
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[0]).sum() == 1


# --- greedy, suppression, logprobs --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_in_any_dtype(dtype):
    x = random_logits(8, seed=3).to(dtype)
    out = Sampler()(x, build([SamplingParams(temperature=0)] * 8))
    assert torch.equal(out.token_ids, x.float().argmax(-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_greedy_rows_ignore_truncation_and_temperature_but_see_penalties():
    x = random_logits(1, seed=4)
    best = x.argmax().item()
    p = SamplingParams(temperature=0, top_k=1, top_p=0.01, min_p=0.9, frequency_penalty=2.0)
    out = Sampler()(x, build([p], output_ids=[[best] * 20]))
    penalised = x.clone()
    penalised[0, best] -= 40.0
    assert out.token_ids.item() == penalised.argmax().item() != best


def test_suppressed_ids_are_never_chosen():
    x = random_logits(4, seed=5)
    top2 = x.topk(2).indices
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.5, seed=3), SamplingParams(temperature=1.5)]
    suppress = [top2[0].tolist(), [], top2[2].tolist() + [V + 5], top2[3].tolist()]  # out-of-vocab id is ignored
    s = Sampler()
    for pos in range(200):
        got = s(x, build(params, output_ids=[[0] * pos] * 4, suppress=suppress)).token_ids.tolist()
        assert got[0] == x[0].argsort(descending=True)[2].item()
        assert got[1] == top2[1, 0].item()
        assert got[2] not in suppress[2] and got[3] not in suppress[3]


def test_logprobs_are_raw_log_softmax_at_chosen_id_with_sorted_alternatives():
    x = random_logits(3, seed=6)
    params = [SamplingParams(temperature=0.5, logprobs=4, repetition_penalty=1.5, seed=1),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(top_k=3)]
    out = Sampler()(x, build(params, [[1, 2], [3], []], [[4], [], []], suppress=[[x[0].argmax().item()], [], []]))
    raw = x.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_ids.shape == (3, 4) and out.top_ids.dtype == torch.int64
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids, raw.topk(4).indices)
    torch.testing.assert_close(out.top_logprobs, raw.topk(4).values)


def test_logprobs_zero_returns_chosen_only_and_none_asked_returns_nothing():
    x = random_logits(2, seed=7)
    out = Sampler()(x, build([SamplingParams(logprobs=0), SamplingParams()]))
    assert out.logprobs.shape == (2,) and out.top_ids is None and out.top_logprobs is None
    out = Sampler()(x, build([SamplingParams(), SamplingParams(temperature=0)]))
    assert out.logprobs is None and out.top_ids is None


def test_sampler_never_modifies_the_callers_logits():
    x = random_logits(2, seed=8)
    before = x.clone()
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0, top_k=3, top_p=0.5, min_p=0.1, seed=1),
              SamplingParams(temperature=0, presence_penalty=1.0)]
    Sampler()(x, build(params, [[1], [2]], [[3], [4]], suppress=[[5], [6]]))
    assert torch.equal(x, before)


def test_sample_reads_no_tensor_value_on_the_host(monkeypatch):
    x = random_logits(4, seed=9)
    params = [SamplingParams(repetition_penalty=1.3, top_k=3, seed=1, logprobs=2), SamplingParams(top_p=0.7),
              SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(min_p=0.1, seed=2)]
    batch = build(params, [[1]] * 4, [[2]] * 4, suppress=[[5]] * 4)
    sampler = Sampler()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = sampler(x, batch)
    monkeypatch.undo()
    assert out.token_ids.shape == (4,)


# --- sampling noise -----------------------------------------------------------------------------------------

def test_seeded_row_is_the_same_alone_or_at_row_7_of_16_among_random_rows():
    x = random_logits(16, seed=10, scale=1.0)
    seeded = SamplingParams(temperature=1.2, top_p=0.95, seed=1234)
    outs_alone = []
    for pos in range(30):
        outs_alone.append(Sampler(seed=1)(x[7:8], build([seeded], output_ids=[[0] * pos])).token_ids.item())
    for pos in range(30):
        params = [SamplingParams(temperature=1.0, seed=(None if i % 2 else i)) for i in range(16)]
        params[7] = seeded
        outputs = [[0] * (pos + i) for i in range(16)]
        outputs[7] = [0] * pos
        together = Sampler(seed=2)(x, build(params, output_ids=outputs)).token_ids[7].item()
        assert together == outs_alone[pos], pos
    assert len(set(outs_alone)) > 5  # the stream really moves with the output position


def test_recomputed_sequence_resumes_the_same_stream():
    # Same seed, same output length, different history (a preemption rebuilds the row from scratch).
    x = random_logits(1, seed=11, scale=1.0)
    p = SamplingParams(seed=5, temperature=1.0)
    first = [Sampler(seed=1)(x, build([p], output_ids=[[0] * n])).token_ids.item() for n in range(20)]
    again = [Sampler(seed=2)(x, build([p], output_ids=[[9] * n])).token_ids.item() for n in range(20)]
    assert first == again


def test_different_seeds_give_different_streams():
    x = torch.zeros(1, V)  # uniform: two streams should agree about 1/V of the time
    def stream(seed):
        return [Sampler()(x, build([SamplingParams(seed=seed)], output_ids=[[0] * n])).token_ids.item()
                for n in range(100)]
    a, b, c = stream(1), stream(2), stream(2**40 + 1)
    assert sum(i == j for i, j in zip(a, b)) < 10
    assert sum(i == j for i, j in zip(a, c)) < 10  # the seed's high bits matter too


def test_seeded_distribution_over_output_positions_matches_softmax():
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    T, n = 0.8, 6000
    probs = (x[0] / T).softmax(-1)
    params = [SamplingParams(temperature=T, seed=77)] * n
    zeros = [0] * n
    tokens = Sampler()(x.expand(n, -1), build(params, output_ids=[zeros[:pos] for pos in range(n)], vocab=6)).token_ids
    counts = torch.bincount(tokens, minlength=6).float()
    assert chi_square(counts, probs) < CHI2_999[5], (counts / n, probs)


def test_seeded_distribution_across_many_seeds_matches_softmax_with_truncation():
    x = torch.tensor([[1.0, 0.8, 0.3, 0.0, -0.5, -2.0]])
    n = 6000
    params = [SamplingParams(temperature=1.0, top_k=4, seed=s) for s in range(n)]
    tokens = Sampler()(x.expand(n, -1), build(params, output_ids=[[]] * n, vocab=6)).token_ids
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[4:].sum() == 0
    assert chi_square(counts[:4], x[0, :4].softmax(-1)) < CHI2_999[3], counts


def test_hashed_noise_is_exponential():
    e = hashed_exponential(torch.tensor([7, 7, 2**62 + 3]), torch.tensor([0, 1, 0]), 100000)
    assert e.dtype == torch.float32 and (e > 0).all() and torch.isfinite(e).all()
    for row in e:
        assert abs(row.mean().item() - 1.0) < 0.02 and abs(row.var().item() - 1.0) < 0.05
        # The empirical CDF against 1 - exp(-q) at a few quantiles (tails included).
        for q in (0.01, 0.1, 0.5, 1.0, 2.0, 5.0):
            assert abs((row < q).float().mean().item() - (1 - torch.exp(torch.tensor(-q))).item()) < 0.005
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    assert torch.corrcoef(e[:2])[0, 1].abs() < 0.02


def test_unseeded_distribution_matches_softmax():
    x = torch.tensor([[1.5, 1.0, 0.0, -0.5, -1.0]])
    T, n = 1.3, 20000
    tokens = Sampler(seed=3)(x.expand(n, -1), build([SamplingParams(temperature=T)] * n, vocab=5)).token_ids
    counts = torch.bincount(tokens, minlength=5).float()
    assert chi_square(counts, (x[0] / T).softmax(-1)) < CHI2_999[4], counts


def test_unseeded_rows_use_the_samplers_seed():
    x = torch.zeros(4, V)
    b = build([SamplingParams()] * 4)
    assert torch.equal(Sampler(seed=1)(x, b).token_ids, Sampler(seed=1)(x, b).token_ids)
    draws = [Sampler(seed=s)(x, b).token_ids for s in range(2, 6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


# --- GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_matches_cpu_for_seeded_rows_and_needs_no_sync():
    cuda = torch.device("cuda")
    x = random_logits(6, vocab=1000, seed=12)
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=s, repetition_penalty=1.2,
                             logprobs=3) for s in range(5)] + [SamplingParams(temperature=0)]
    args = ([[1, 2]] * 6, [[3, 3]] * 6, [[4]] * 6)
    cpu_out = Sampler()(x, SamplingBatch.build(params, *args, 1000, CPU))
    batch = SamplingBatch.build(params, *args, 1000, cuda)
    x_cuda = x.to(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_out = Sampler()(x_cuda, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu_out.token_ids.cpu(), cpu_out.token_ids)
    torch.testing.assert_close(gpu_out.logprobs.cpu(), cpu_out.logprobs)
    # The integer hash is identical; CPU and CUDA log1p may differ in the last ulp.
    torch.testing.assert_close(
        hashed_exponential(torch.tensor([9]), torch.tensor([3]), 5000),
        hashed_exponential(torch.tensor([9], device=cuda), torch.tensor([3], device=cuda), 5000).cpu(),
        rtol=1e-6, atol=1e-6)
