"""Overlapped steps (step N+1 planned and launched before step N's tokens are read) change nothing visible.

The engine plans a sequence whose newest token is still being sampled with a
PENDING input; when that token turns out to stop the request (a stop token,
a stop string, EOS, the length limit) the row planned after it is void.
These tests run the same mixed batch with ``async_scheduling`` on and off and
require identical results, and the cache to be whole afterwards.
"""
import pytest

from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.sequence import PENDING


def _run(model_dir, async_scheduling, **engine_kw):
    eng = InferenceEngine(model_dir, device="cpu", async_scheduling=async_scheduling, seed=3, **engine_kw)
    prompts = [[5 + i, 9, 14 + 2 * i, 3] * (1 + i % 3) for i in range(10)]
    # Stop tokens taken from a greedy run's outputs make requests stop mid-batch, with a step in flight.
    probe = eng.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[probe[1].token_ids[4]]),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[probe[2].token_ids[1]], logprobs=2),
        SamplingParams(temperature=0.9, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=12, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, min_tokens=5, ignore_eos=False),
        SamplingParams(temperature=0.8, seed=5, top_k=5, top_p=0.9, max_tokens=10, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0, max_tokens=6, stop=["a"]),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    ]
    outs = eng.generate(prompts, params)
    stats = eng.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and not eng.has_unfinished_requests()
    for o in outs:
        assert PENDING not in o.token_ids
    return outs


def _same(a, b):
    # Tokens, reasons and text must be identical. Logprobs may differ in the last float32 bits: overlap
    # changes which rows share a step, and a matmul over a different batch shape rounds differently.
    assert [(o.token_ids, o.finish_reason, o.text) for o in a] == [(o.token_ids, o.finish_reason, o.text) for o in b]
    for x, y in zip(a, b):
        assert [lp.token_id for lp in x.logprobs or []] == [lp.token_id for lp in y.logprobs or []]
        assert [lp.logprob for lp in x.logprobs or []] == pytest.approx([lp.logprob for lp in y.logprobs or []],
                                                                         abs=1e-4)


@pytest.mark.parametrize("engine_kw", [{}, {"max_num_batched_tokens": 16, "num_kv_blocks": 12, "block_size": 16}],
                         ids=["roomy", "chunked-and-preempting"])
def test_overlapped_steps_give_the_same_results_as_synchronous_ones(tiny_model, engine_kw):
    d = tiny_model("llama")
    _same(_run(d, True, **engine_kw), _run(d, False, **engine_kw))


def test_penalties_turn_overlap_off_and_stay_exact(tiny_model):
    d = tiny_model("llama")
    results = []
    for async_scheduling in (True, False):
        eng = InferenceEngine(d, device="cpu", async_scheduling=async_scheduling)
        p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                           frequency_penalty=0.5)
        results.append([o.token_ids for o in eng.generate([[3, 4, 5], [7, 7, 7, 7]], p)])
    assert results[0] == results[1]


def test_streamed_outputs_never_show_a_pending_token(tiny_model):
    eng = InferenceEngine(tiny_model("llama"), device="cpu")
    want = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    assert [t for t, _ in eng.stream_generate([3, 4, 5], max_tokens=6, temperature=0, ignore_eos=True)] == want
    e = eng.engine
    e.add_request("s", [3, 4, 5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), stream=True)
    seen = []
    while e.has_unfinished_requests():
        for out in e.step():
            assert PENDING not in out.token_ids and PENDING not in out.new_token_ids
            assert out.token_ids == want[: len(out.token_ids)]
            seen.extend(out.new_token_ids)
    assert seen == want
