"""n samples per request: the prompt computed once and its KV blocks shared, each sample what a separate request
seeded ``sample_seed(seed, j)`` would give, also across preemption, chunked prefill and abort."""
import pytest

from model_factory import SAFE_PROMPTS, hf_greedy
from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.sampling_params import sample_seed

MAX_NEW = 16
SEEDED = dict(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
ROOMY = dict(device="cpu", dtype="float32", num_kv_blocks=128)  # the default 1 GiB cache costs seconds to allocate
GREEDY = dict(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engine(model):
    return InferenceEngine(model, **ROOMY)


def long_prompt(length, start=5):
    return [start + (7 * i) % 300 for i in range(length)]


def _all_free(eng):
    stats = eng.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"], "blocks leaked"
    assert all(c == 0 for c in eng.engine.block_manager.ref_counts)
    assert not eng.has_unfinished_requests()
    return stats


def test_seeded_samples_are_separate_requests_seeded_with_sample_seed(engine):
    prompt = long_prompt(23)
    outs = engine.generate([prompt], SamplingParams(n=4, seed=1234, **SEEDED))
    assert [o.sample_index for o in outs] == [0, 1, 2, 3]
    separate = engine.generate([prompt] * 4, [SamplingParams(seed=sample_seed(1234, j), **SEEDED) for j in range(4)])
    assert [o.token_ids for o in outs] == [o.token_ids for o in separate]
    assert len({tuple(o.token_ids) for o in outs}) == 4
    _all_free(engine)


def test_each_sample_has_its_own_penalties_logprobs_stop_strings_and_min_tokens(engine):
    prompt = long_prompt(20, start=11)
    base = dict(temperature=0.9, max_tokens=12, seed=77, repetition_penalty=1.3, frequency_penalty=0.4,
                logprobs=2, min_tokens=3)
    probe = engine.generate([prompt], SamplingParams(n=3, **base))
    stop = probe[1].text[4:6]  # sample 1 stops on its own stop string; the others may or may not
    params = SamplingParams(n=3, stop=[stop], **base)
    outs = engine.generate([prompt], params)
    separate = engine.generate([prompt] * 3, [params.replace(n=1, seed=sample_seed(77, j)) for j in range(3)])
    key = [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs]
    assert key == [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in separate]
    assert outs[1].finish_reason == "stop" and outs[1].stop_reason == stop
    for o, s in zip(outs, separate):
        assert [lp.token_id for lp in o.logprobs] == o.token_ids
        assert [lp.logprob for lp in o.logprobs] == pytest.approx([lp.logprob for lp in s.logprobs], abs=1e-4)
    _all_free(engine)


def test_greedy_samples_are_identical_and_equal_hugging_face(model, engine):
    tok = engine.tokenizer
    prompts = [tok(t)["input_ids"] for t in SAFE_PROMPTS[:2]]
    ref = hf_greedy(model, prompts, MAX_NEW)
    outs = engine.generate(prompts, SamplingParams(n=4, **GREEDY))
    assert [o.token_ids for o in outs] == [ref[0]] * 4 + [ref[1]] * 4
    assert [o.sample_index for o in outs] == [0, 1, 2, 3] * 2
    _all_free(engine)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("length, copies", [(40, 3), (48, 0)], ids=["partly-filled-last-block", "full-blocks"])
def test_the_prompt_is_computed_once_and_only_a_partly_filled_last_block_is_copied(model, cache, length, copies):
    eng = InferenceEngine(model, **ROOMY, enable_prefix_caching=cache, block_size=16)
    eng.generate([long_prompt(length)], SamplingParams(n=4, seed=3, **{**SEEDED, "max_tokens": 4}))
    stats = _all_free(eng)
    assert stats["prefill_tokens"] == length  # not 4 * length
    assert stats["forked_seqs"] == 3 and stats["cow_block_copies"] == copies
    if cache:
        assert stats["prefix_cache_hit_tokens"] == 0  # shared by forking, not found in the cache


def test_after_the_prompt_step_every_sample_holds_every_prompt_block(model):
    eng = InferenceEngine(model, **ROOMY, enable_prefix_caching=False, block_size=16)
    e = eng.engine
    e.add_request("r", long_prompt(40), SamplingParams(n=3, seed=3, **SEEDED))
    e.step()  # computes the prompt once and forks samples 1 and 2 off it
    samples = e._seqs["r"]
    assert [s.sample_index for s in samples] == [0, 1, 2]
    table = samples[0].block_table
    assert len(table) == 3 and all(s.block_table == table for s in samples)
    assert [e.block_manager.ref_counts[b] for b in table] == [3, 3, 3]
    assert e.block_manager.num_used_blocks == 3
    e.step()  # each writes its first token: two copy the shared last block, the last one writes in place
    assert [s.block_table[:2] for s in samples] == [table[:2]] * 3
    assert len({s.block_table[2] for s in samples}) == 3 and table[2] in {s.block_table[2] for s in samples}
    assert [e.block_manager.ref_counts[b] for b in table] == [3, 3, 1]
    while e.has_unfinished_requests():
        e.step()
    _all_free(eng)


@pytest.mark.parametrize("cache", [False, True])
def test_preempted_samples_resume_and_give_the_unpreempted_results(model, cache):
    prompts = [long_prompt(21), long_prompt(30, start=9), long_prompt(17, start=40)]
    params = [SamplingParams(n=4, **GREEDY), SamplingParams(n=4, seed=5, **SEEDED),
              SamplingParams(n=3, seed=6, top_k=20, **SEEDED)]
    roomy = InferenceEngine(model, **ROOMY, enable_prefix_caching=cache)
    want = roomy.generate(prompts, params)
    assert len({tuple(o.token_ids) for o in want[:4]}) == 1
    # Room for about three sequences and a budget below every prompt: chunked prefill, and samples preempted
    # (and recomputed from the prompt and their own tokens) after the fork.
    tight = InferenceEngine(model, device="cpu", enable_prefix_caching=cache, block_size=16, num_kv_blocks=7,
                            max_num_batched_tokens=8)
    got = tight.generate(prompts, params)
    assert [(o.token_ids, o.sample_index) for o in got] == [(o.token_ids, o.sample_index) for o in want]
    stats = _all_free(tight)
    assert stats["preemptions"] > 0 and stats["forked_seqs"] == 8
    assert any(o.num_preemptions for o in got if o.sample_index > 0), "the test meant to preempt forked samples"


def test_abort_ends_every_sample_and_frees_every_block(model):
    eng = InferenceEngine(model, **ROOMY)
    e = eng.engine
    for steps in (0, 1, 3):  # before the prompt runs, with the fork in flight, and while the samples decode
        e.add_request("r", long_prompt(40), SamplingParams(n=4, seed=1, **SEEDED))
        e.add_request("other", long_prompt(10), SamplingParams(**GREEDY))
        for _ in range(steps):
            e.step()
        assert e.abort_request("r")
        outs = []
        while e.has_unfinished_requests():
            outs += e.step()
        assert [o.request_id for o in outs if o.finished] == ["other"]
        assert not e.abort_request("r")
        _all_free(eng)


def test_more_samples_than_max_num_seqs_give_one_error_output_per_sample(model):
    eng = InferenceEngine(model, **ROOMY, max_num_seqs=2)
    outs = eng.generate([long_prompt(5), long_prompt(6)], [SamplingParams(n=3, **GREEDY), SamplingParams(n=2, **GREEDY)])
    assert [(o.finish_reason, o.sample_index) for o in outs[:3]] == [("error", 0), ("error", 1), ("error", 2)]
    assert "n (3) exceeds max_num_seqs (2)" in outs[0].error
    assert [(o.finish_reason, o.sample_index) for o in outs[3:]] == [("length", 0), ("length", 1)]
    too_long = eng.generate([long_prompt(5)], SamplingParams(n=2, max_tokens=10**6))
    assert [(o.finish_reason, o.sample_index) for o in too_long] == [("error", 0), ("error", 1)]
    _all_free(eng)


def test_streaming_samples_stream_separately(engine):
    e = engine.engine
    params = SamplingParams(n=3, seed=9, **SEEDED)
    want = engine.generate([long_prompt(12)], params)
    e.add_request("s", long_prompt(12), params, stream=True)
    streamed = {0: [], 1: [], 2: []}
    texts = {0: "", 1: "", 2: ""}
    finals = {}
    while e.has_unfinished_requests():
        for out in e.step():
            streamed[out.sample_index] += out.new_token_ids
            texts[out.sample_index] += out.new_text
            if out.finished:
                finals[out.sample_index] = out
    assert [streamed[j] for j in range(3)] == [o.token_ids for o in want]
    assert [texts[j] for j in range(3)] == [finals[j].text for j in range(3)] == [o.text for o in want]
