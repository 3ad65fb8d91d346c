"""What a step reuses from the one before (the block table, the sampling settings) is what a rebuild from
every sequence would give, through forks, copy-on-write, preemption, chunked prefill, prefix caching,
finishing rows, seeded rows and rows with penalties or min_tokens."""
import dataclasses

import pytest
import torch

from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.sampler import SamplingBatch
from pagedbatch.engine.step_inputs import StepInputBuilder


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def _checked(eng):
    """Wrap the runner so every step's inputs and sampling batch are compared with a fresh build."""
    runner = eng.engine.runner
    counts = {"steps": 0, "batches": 0, "decode_only": 0}
    build = runner.inputs.build

    def checked_build(plan, prev_tokens=None, int32=True):
        if all(n == 1 for n in plan.num_new_tokens):  # the decode-only comprehensions agree with the general loop
            assert StepInputBuilder._decode_rows(plan.seqs) == StepInputBuilder._rows(plan.seqs, plan.num_new_tokens)
            counts["decode_only"] += 1
        got = build(plan, prev_tokens, int32)
        want = StepInputBuilder(runner.device, runner.block_size, runner.inputs.max_blocks_per_seq).build(plan, prev_tokens)
        assert got.header == want.header
        assert torch.equal(got.packed, want.packed), "incrementally updated step inputs differ from a rebuild"
        counts["steps"] += 1
        return got

    get = runner.sampling_batches.get

    def checked_get(seqs, suppressed, vocab_size, device):
        got = get(seqs, suppressed, vocab_size, device)
        want = SamplingBatch.build([s.params for s in seqs],
                                   [s.prompt_token_ids if s.params.has_penalties else [] for s in seqs],
                                   [s.output_token_ids for s in seqs], [suppressed(s) for s in seqs],
                                   vocab_size, device)
        for f in dataclasses.fields(SamplingBatch):
            a, b = getattr(got, f.name), getattr(want, f.name)
            if isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor) and torch.equal(a, b), f.name
            else:
                assert a == b, f.name
        counts["batches"] += 1
        return got

    runner.inputs.build = checked_build
    runner.sampling_batches.get = checked_get
    return counts


def _prompts(k, length=20):
    return [[3 + (5 * i + 11 * j) % 200 for i in range(length + 3 * j)] for j in range(k)]


@pytest.mark.parametrize("case", ["forks-and-preemption", "mixed-settings", "alike-rows-finishing"])
def test_reused_block_tables_and_sampling_batches_equal_a_rebuild_every_step(model, case):
    if case == "forks-and-preemption":
        # 20 blocks of 16 tokens cannot hold 4 prompts x 3 samples growing to ~70 tokens: sequences are
        # preempted and recomputed; samples share their prompt's blocks and copy the last one on write.
        eng = InferenceEngine(model, device="cpu", dtype="float32", num_kv_blocks=20, block_size=16,
                              max_num_batched_tokens=48)
        params = SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=40, ignore_eos=True)
        prompts = _prompts(4) + [_prompts(1)[0]]  # the last repeats the first: a prefix-cache hit
    elif case == "alike-rows-finishing":
        # Rows leave one by one from a batch that samples alike (temperatures differ, but no row is greedy,
        # seeded, truncated or asks for logprobs): the kept rows' settings are reused.
        eng = InferenceEngine(model, device="cpu", dtype="float32", num_kv_blocks=128, block_size=16)
        params = [SamplingParams(temperature=0.5 + 0.1 * j, max_tokens=5 + 4 * j, ignore_eos=True) for j in range(6)]
        prompts = _prompts(len(params))
    else:
        eng = InferenceEngine(model, device="cpu", dtype="float32", num_kv_blocks=128, block_size=16)
        base = dict(max_tokens=30, ignore_eos=True)
        params = [SamplingParams(temperature=0, **base), SamplingParams(temperature=0.8, seed=9, **base),
                  SamplingParams(temperature=0.8, **base), SamplingParams(temperature=0.7, min_tokens=6, **base),
                  SamplingParams(temperature=0.9, seed=3, max_tokens=7, ignore_eos=True),
                  SamplingParams(temperature=0.9, repetition_penalty=1.2, max_tokens=12, ignore_eos=True)]
        prompts = _prompts(len(params))
    counts = _checked(eng)
    outs = eng.generate(prompts, params)
    assert all(o.finish_reason == "length" for o in outs)
    runner = eng.engine.runner
    # Both paths ran: some steps reused, some rebuilt (the test would prove nothing otherwise).
    assert 0 < runner.inputs.table_rebuilds < counts["steps"]
    assert 0 < runner.sampling_batches.reused < counts["batches"]
    assert 0 < counts["decode_only"] < counts["steps"]
    if case == "forks-and-preemption":
        assert eng.engine.scheduler.stats.preemptions > 0 and eng.engine.block_manager.num_cow_copies > 0


def test_reused_steps_give_the_tokens_of_an_engine_that_rebuilds_every_step(model):
    prompts = _prompts(5)
    params = SamplingParams(n=2, seed=17, temperature=0.8, max_tokens=24, ignore_eos=True)
    eng = InferenceEngine(model, device="cpu", dtype="float32", num_kv_blocks=24, block_size=16)
    want = [o.token_ids for o in eng.generate(prompts, params)]
    # The same engine with both caches defeated: every step rebuilds.
    runner = eng.engine.runner
    build, get = runner.inputs.build, runner.sampling_batches.get

    def fresh_build(plan, prev_tokens=None, **kw):
        runner.inputs._table = None
        return build(plan, prev_tokens, **kw)

    def fresh_get(*a):
        runner.sampling_batches._batch = None
        return get(*a)

    runner.inputs.build, runner.sampling_batches.get = fresh_build, fresh_get
    assert [o.token_ids for o in eng.generate(prompts, params)] == want
