"""The fused one-pass sampling kernel (sampling_kernels.py) picks the torch sampler's tokens.

The tests without a mark run where the kernel runs: on the GPU when there is one, else in
Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), so
small vocabularies and few rows (the interpreter costs ~10 ms per program). GPU only
(``-m gpu``): real shapes, bf16 logits, no host sync, the engine.

Tie tolerance: the kernel repeats the torch path's float operations in the same order, but
the interpreter's log1p/log are not torch's CPU code (they differ by up to an ulp), and two
scores can be exactly equal. Where the tokens differ, the kernel's token must score within
4 ulps of the torch path's maximum, both under the torch path's own scores.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from pagedbatch.engine import sampling_kernels  # noqa: E402
from pagedbatch.engine.sampler import Sampler, SamplingBatch, hashed_exponential, token_hashes  # noqa: E402
from pagedbatch.sampling_params import SamplingParams  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = torch.finfo(torch.float32).tiny


def build(params, output_ids=None, vocab=3000, device=DEV, **lists):
    B = len(params)
    return SamplingBatch.build(params, lists.get("prompt_ids") or [[] for _ in range(B)],
                               output_ids or [[] for _ in range(B)], lists.get("suppress") or [[] for _ in range(B)],
                               vocab, device)


def logits(B, V, seed=0, scale=3.0, device=DEV, dtype=torch.float32):
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale
    return x.to(dtype).to(device)


def torch_scores(x, b):
    """The torch path's perturbed scores: raw logits on greedy rows, x / T + G on seeded rows."""
    s = x.float()
    if b.any_seeded:
        e = hashed_exponential(b.seeds, b.positions, x.shape[-1])
        s = s.clone()
        rows = b.seeded_rows
        s[rows] = s[rows] / b.temperature[rows, None] - e.clamp_min(TINY).log()
    return s


def assert_same_or_tied(got, want, scores, rows):
    """Tokens equal on ``rows``, or the kernel's token scores within 4 ulps of the maximum."""
    got, want, scores = got.cpu(), want.cpu(), scores.cpu()
    for r in rows:
        g, w = got[r].item(), want[r].item()
        if g != w:
            top = scores[r, w].item()
            gap = top - scores[r, g].item()
            assert 0 <= gap <= 4 * torch.finfo(torch.float32).eps * abs(top), (r, g, w, gap)


def call(x, b, splits, step_key=None):
    return sampling_kernels.fused_sample(x, b.temperature, b.greedy if b.any_greedy else None, b.seed_slot,
                                         b.seeds, b.positions, step_key, splits)


def chi_square(tokens, probs):
    counts = torch.bincount(tokens.cpu(), minlength=len(probs)).float()
    expected = probs.cpu() * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


# Chi-square critical values at p = 0.001 (2 and 3 degrees of freedom).
CHI2_999_DF2, CHI2_999_DF3 = 13.82, 16.27


# --- the hash -----------------------------------------------------------------------------------------------

def test_kernel_hash_is_bit_identical_to_the_torch_hash_and_its_noise_within_an_ulp():
    seeds = torch.tensor([0, 7, 2**62 + 3, 2**63 - 1], device=DEV)
    positions = torch.tensor([0, 1, 2**40 + 5, 123456], device=DEV)
    V = 2 * sampling_kernels.BLOCK + 77  # a partial last tile
    h, e = sampling_kernels.hashed_noise(seeds, positions, V)
    assert torch.equal(h, token_hashes(seeds, positions, V))
    ref = hashed_exponential(seeds, positions, V)
    assert (e > 0).all() and torch.isfinite(e).all()
    assert ((e - ref).abs() <= torch.finfo(torch.float32).eps * ref).all()


def test_cheap_gumbel_that_decides_which_tiles_to_skip_is_within_an_eighth_of_the_slack():
    # On the GPU this checks the hardware log2; in the interpreter (numpy's log2) the series and its cutoff.
    n = 1 << (20 if DEV.type == "cuda" else 12)
    edges = torch.cat([torch.arange(n), 2**32 - 1 - torch.arange(n),  # u near 0 and near 1
                       2**26 + torch.arange(-n // 2, n // 2),  # u near 2**-6, where the series takes over
                       torch.randint(0, 2**32, (n,), generator=torch.Generator().manual_seed(0))])
    g, cheap = sampling_kernels.gumbel_pair(edges.to(DEV))
    assert (cheap - g).abs().max().item() <= sampling_kernels.SLACK_ABS / 8


# --- token choice -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [1, 3])
def test_greedy_rows_are_exact_argmax_with_the_first_id_winning_ties(splits):
    x = torch.randint(-3, 4, (4, 5000), generator=torch.Generator().manual_seed(1)).float().to(DEV)  # many ties
    x[1, :4000] = float("-inf")
    x[2] = float("-inf")  # torch.argmax answers 0
    x[3, 4999] = 10.0  # the very last id
    b = build([SamplingParams(temperature=0)] * 4, vocab=5000)
    assert torch.equal(call(x, b, splits), x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forced_fused_sampler_matches_torch_sampler_on_seeded_rows_at_many_temperatures(dtype):
    temps = [0.01, 0.3, 0.6, 1.0, 1.7, 4.0]
    params = [SamplingParams(temperature=t, seed=1000 + i) for i, t in enumerate(temps)]
    b = build(params, output_ids=[[0] * (3 * i) for i in range(len(temps))], vocab=5000)
    x = logits(len(temps), 5000, seed=2, dtype=dtype)
    got = Sampler(fused=True)(x, b).token_ids
    want = Sampler(fused=False)(x, b).token_ids
    assert_same_or_tied(got, want, torch_scores(x, b), range(len(temps)))
    assert got[0] == x[0].float().argmax()  # T = 0.01: the noise cannot overcome the logit gaps


def test_seeded_rows_do_not_depend_on_the_split_count():
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(3)]
    b = build(params, vocab=5000)
    x = logits(3, 5000, seed=3)
    want = Sampler(fused=False)(x, b).token_ids
    for splits in (1, 2, 3):
        assert_same_or_tied(call(x, b, splits), want, torch_scores(x, b), range(3))


def test_mixed_greedy_seeded_unseeded_batch():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.6, seed=5), SamplingParams(temperature=0.6),
              SamplingParams(temperature=1.2, seed=2**50), SamplingParams(temperature=0), SamplingParams()]
    outputs = [[1] * i for i in range(6)]
    b = build(params, output_ids=outputs)
    x = logits(6, 3000, seed=4)
    got = Sampler(fused=True, seed=1)(x, b).token_ids
    want = Sampler(fused=False)(x, b).token_ids
    assert_same_or_tied(got, want, torch_scores(x, b), [0, 1, 3, 4])
    assert ((got >= 0) & (got < 3000)).all()
    # A seeded row alone, at another row index, among other batch-mates: the same token.
    alone = Sampler(fused=True, seed=9)(x[3:4], build([params[3]], output_ids=[outputs[3]])).token_ids
    assert alone.item() == got[3].item()
    others = [SamplingParams(temperature=0.5), params[3], SamplingParams(temperature=0)]
    moved = Sampler(fused=True, seed=2)(x[[0, 3, 5]], build(others, output_ids=[[], outputs[3], []])).token_ids
    assert moved[1].item() == got[3].item()


def test_masked_tokens_are_never_chosen_and_an_all_masked_row_answers_zero():
    V, B = 3000, 12
    x = logits(B, V, seed=5, scale=8.0)
    allowed = torch.tensor([3, 1500, 2047, 2048, 2999], device=DEV)  # around tile edges
    masked = torch.full_like(x, float("-inf"))
    masked[:, allowed] = x[:, allowed]
    masked[B - 1] = float("-inf")
    params = [SamplingParams(temperature=0.0 if i % 3 == 0 else 1.5, seed=(i if i % 3 == 1 else None))
              for i in range(B)]
    b = build(params)
    for splits in (1, 2):
        got = call(masked, b, splits, step_key=torch.tensor([11], device=DEV))
        assert torch.isin(got[:-1], allowed).all(), got
        assert got[-1] == 0  # like torch.argmax of an all -inf row


def test_logprobs_with_the_fused_path_are_the_raw_distribution_at_the_chosen_token():
    x = logits(3, 3000, seed=6)
    params = [SamplingParams(temperature=0.7, seed=1, logprobs=3), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=1.0, logprobs=2)]
    out = Sampler(fused=True)(x, build(params))
    raw = x.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.top_ids, raw.topk(3).indices)


# --- unseeded rows ------------------------------------------------------------------------------------------

def test_unseeded_rows_follow_the_samplers_seed_and_change_every_call():
    x = torch.zeros(4, 3000, device=DEV)  # uniform: repeats are a 1-in-3000 event
    b = build([SamplingParams()] * 4)
    a, a2 = Sampler(seed=1, fused=True), Sampler(seed=1, fused=True)
    first = [a(x, b).token_ids for _ in range(2)]
    assert all(torch.equal(f, a2(x, b).token_ids) for f in first)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], Sampler(seed=2, fused=True)(x, b).token_ids)
    assert len(set(first[0].tolist())) > 1  # rows of one call draw differently


# --- distribution (the Gumbel-max race samples softmax(logits / T)) ------------------------------------------

# Probabilities (.644, .237, .087, .032): every expected count >= 5 at 200 draws, and a kernel that
# ignored T (.455, .276, .167, .101) would score a chi-square near 55 there.
X4 = torch.tensor([1.0, 0.5, 0.0, -0.5], device=DEV)
T = 0.5
PROBS = (X4 / T).softmax(-1)


def test_seeded_draws_over_many_seeds_follow_softmax():
    n = 200
    b = build([SamplingParams(temperature=T, seed=s) for s in range(n)], vocab=4)
    tokens = call(X4.expand(n, -1), b, 1)
    assert chi_square(tokens, PROBS) < CHI2_999_DF3, torch.bincount(tokens)


def test_unseeded_draws_across_rows_and_across_calls_follow_softmax():
    n = 200
    rows = Sampler(seed=4, fused=True)(X4.expand(n, -1), build([SamplingParams(temperature=T)] * n, vocab=4))
    assert chi_square(rows.token_ids, PROBS) < CHI2_999_DF3, torch.bincount(rows.token_ids)
    # One row over 80 calls (each keyed by a fresh draw from the generator), tokens 2 and 3 pooled
    # so that every expected count is >= 5; a key that did not change would repeat one token.
    s, one = Sampler(seed=5, fused=True), build([SamplingParams(temperature=T)], vocab=4)
    calls = torch.cat([s(X4[None], one).token_ids for _ in range(80)]).clamp(max=2)
    assert chi_square(calls, torch.cat([PROBS[:2], PROBS[2:].sum(0, keepdim=True)])) < CHI2_999_DF2, calls


# --- when the fused path runs -------------------------------------------------------------------------------

def _spy(monkeypatch):
    calls = []
    real = sampling_kernels.fused_sample

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_kernels, "fused_sample", spy)
    return calls


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.2),
                                dict(presence_penalty=0.5), dict(frequency_penalty=0.5), "suppress"])
def test_rows_needing_other_stages_send_the_whole_batch_down_the_torch_path(monkeypatch, kw):
    calls = _spy(monkeypatch)
    x = logits(2, 64, seed=7)
    other = SamplingParams(seed=3) if kw == "suppress" else SamplingParams(seed=3, **kw)
    b = build([SamplingParams(temperature=0.8, seed=1), other], vocab=64, prompt_ids=[[1], [2]],
              output_ids=[[3], [4]], suppress=[[], [5]] if kw == "suppress" else None)
    assert torch.equal(Sampler(fused=True)(x, b).token_ids, Sampler(fused=False)(x, b).token_ids)
    assert not calls


def test_auto_mode_keeps_the_torch_path_on_the_cpu_and_forcing_runs_the_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0)]
    cpu = torch.device("cpu")
    Sampler()(logits(2, 64, seed=8, device=cpu), build(params, vocab=64, device=cpu))
    x, b = logits(2, 64, seed=8), build(params, vocab=64)
    Sampler(fused=False)(x, b)
    assert not calls
    Sampler(fused=True)(x, b)
    assert len(calls) == 1


# --- GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_kernel_noise_is_bit_identical_to_the_torch_cuda_noise():
    cuda = torch.device("cuda")
    seeds = torch.tensor([0, 9, 2**62 + 3, 2**63 - 1], device=cuda)
    positions = torch.tensor([0, 3, 2**40 + 5, 4095], device=cuda)
    h, e = sampling_kernels.hashed_noise(seeds, positions, 151936)
    assert torch.equal(h, token_hashes(seeds, positions, 151936))
    ref = hashed_exponential(seeds, positions, 151936)
    assert torch.equal(e, ref), ((e != ref).sum().item(), (e - ref).abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 152064])
@pytest.mark.parametrize("B", [1, 256, 512])
def test_gpu_fused_sampler_matches_the_torch_path_on_bf16_logits_without_a_host_sync(B, V):
    cuda = torch.device("cuda")
    # Every 5th row greedy, every 7th unseeded, the rest seeded at mixed temperatures and positions.
    params = [SamplingParams(temperature=0) if i % 5 == 4 else
              SamplingParams(temperature=(0.6, 1.0, 0.3)[i % 3], seed=(None if i % 7 == 6 else 17 * i + 1))
              for i in range(B)]
    b = build(params, output_ids=[[0] * (i % 50) for i in range(B)], vocab=V, device=cuda)
    x = logits(B, V, seed=B, scale=2.5, device=cuda, dtype=torch.bfloat16)
    fused = Sampler(fused=True, seed=1)
    fused(x, b)  # compiles the kernels outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fused(x, b).token_ids
        auto = Sampler(seed=1)(x, b).token_ids  # auto mode takes the fused path on CUDA
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = Sampler(fused=False)(x, b).token_ids
    checked = [i for i, p in enumerate(params) if p.greedy or p.seed is not None]
    assert_same_or_tied(got, want, torch_scores(x, b), checked)
    assert_same_or_tied(auto, want, torch_scores(x, b), checked)
    assert ((got >= 0) & (got < V)).all()


def test_split_count_keeps_the_reduce_step_for_every_batch_size_and_stays_under_the_reduce_width():
    """Whether the reduce kernel runs, and its width, must not depend on the batch size (a batch growing past
    a threshold would compile a new variant mid-job); tiny vocabularies need no split at all."""
    V = 151936
    splits = [sampling_kernels.default_splits(B, V, 132) for B in (1, 2, 7, 15, 75, 263, 264, 527, 528, 4096)]
    assert all(2 <= s <= sampling_kernels.MAX_SPLITS for s in splits), splits
    assert splits[0] == sampling_kernels.MAX_SPLITS and splits[-1] == 2  # many programs per row at batch 1
    assert sampling_kernels.default_splits(5, sampling_kernels.BLOCK, 132) == 1


@pytest.mark.gpu
def test_gpu_fused_sampler_compiles_one_variant_for_every_batch_size():
    from pagedbatch.engine.triton_variants import compiled_variants

    cuda = torch.device("cuda")
    sampler = Sampler(fused=True, seed=1)
    counts = []
    for B in (1, 3, 16, 17, 75, 147, 264, 512, 600):
        b = build([SamplingParams(temperature=0.7)] * B, vocab=151936, device=cuda)
        sampler(logits(B, 151936, seed=B, device=cuda, dtype=torch.bfloat16), b)
        counts.append((compiled_variants(sampling_kernels._sample_kernel),
                       compiled_variants(sampling_kernels._reduce_kernel)))
    assert counts == [counts[0]] * len(counts), counts


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 75])
def test_gpu_split_counts_agree(splits):
    cuda = torch.device("cuda")
    params = [SamplingParams(temperature=0.6, seed=s) for s in range(32)] + [SamplingParams(temperature=0)] * 4
    b = build(params, vocab=151936, device=cuda)
    x = logits(36, 151936, seed=9, scale=2.5, device=cuda, dtype=torch.bfloat16)
    want = Sampler(fused=False)(x, b).token_ids
    assert_same_or_tied(call(x, b, splits), want, torch_scores(x, b), range(36))


@pytest.mark.gpu
def test_gpu_engine_gives_seeded_requests_the_same_tokens_with_and_without_the_fused_sampler(tiny_model):
    import gc

    from pagedbatch import InferenceEngine

    prompts = [[5 + i, 9, 14 + 2 * i, 3] * (1 + i % 3) for i in range(6)]
    params = [SamplingParams(temperature=(0.6, 1.0, 0)[i % 3], seed=(100 + i if i != 4 else None), max_tokens=12,
                             ignore_eos=True) for i in range(6)]
    outs = {}
    for fused in (True, False):
        eng = InferenceEngine(tiny_model("qwen3"), device="cuda", dtype="bfloat16", num_kv_blocks=64,
                              fused_sampler=fused)
        assert eng.engine.runner.sampler.fused is (None if fused else False)
        outs[fused] = [o.token_ids for o in eng.generate(prompts, params)]
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    for i, p in enumerate(params):
        assert len(outs[True][i]) == 12
        if p.seed is not None or p.greedy:  # row 4 is unseeded: random in both runs
            assert outs[True][i] == outs[False][i], i
