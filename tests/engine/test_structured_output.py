"""Structured output in the engine (xgrammar): the constraint alone makes a random model's text valid.

The tiny models have random weights, so whatever they write under a JSON
schema, regex or choice list is valid only because of the token mask. The
schemas bound every string (maxLength), array (maxItems) and number
(minimum/maximum): a finite grammar ends, so every output completes well
inside max_tokens instead of rambling inside a string until it runs out.
"""
from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import jsonschema
import pytest
from model_factory import SAFE_PROMPTS

from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.sequence import PENDING
from pagedbatch.structured_output import StructuredOutputError

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
        },
        "required": ["name", "age", "address"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": -5, "maximum": 5000},
                "ok": {"type": "boolean"}}, "required": ["id", "ok"]}},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["items", "score"],
    },
    "enums_and_unicode": {
        "type": "object",
        "properties": {
            "lang": {"enum": ["日本語", "café", "naïve \"quoted\"", "emoji 🚀"]},
            "word": {"type": "string", "minLength": 1, "maxLength": 5},
            "flag": {"type": ["boolean", "null"]},
        },
        "required": ["lang", "word", "flag"],
    },
    "array_root": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1,
                   "maxItems": 4},
}
FREE = [
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, seed=7, top_k=20, max_tokens=12, ignore_eos=True),
]


@pytest.fixture(scope="module")
def llama(tiny_model) -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engine(llama) -> InferenceEngine:
    return InferenceEngine(llama, device="cpu")


def _sampled(seed: int, **so) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured_output=so)


def test_every_json_output_parses_and_validates_against_its_schema(engine):
    prompts, params, schemas = [], [], []
    for k, schema in enumerate(SCHEMAS.values()):
        for i, prompt in enumerate(SAFE_PROMPTS[:3]):
            prompts.append(prompt)
            params.append(_sampled(100 * k + i, json=schema))
            schemas.append(schema)
    outs = engine.generate(prompts, params)
    for out, schema in zip(outs, schemas):
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    # Several distinct outputs per schema: the mask constrains, it does not force one answer.
    assert len({o.text for o in outs[:3]}) > 1


def test_json_object_outputs_are_json_objects(engine):
    outs = engine.generate(list(SAFE_PROMPTS[:3]), [SamplingParams(temperature=0.7, seed=s, max_tokens=64,
                                                                   structured_output={"json_object": True})
                                                    for s in range(3)])
    for out in outs:
        if out.finish_reason == "stop":  # an unbounded object may still be going at max_tokens
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_regex_outputs_match_in_full(engine):
    patterns = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no), because [a-z]{1,8}\.", r"[A-Z][a-z]{0,6}@[a-z]{2,5}\.(com|org)"]
    outs = engine.generate(list(SAFE_PROMPTS[:3]), [_sampled(i, regex=pattern) for i, pattern in enumerate(patterns)])
    for pattern, out in zip(patterns, outs):
        assert out.finish_reason == "stop"
        assert re.fullmatch(pattern, out.text), (pattern, out.text)


def test_choice_outputs_are_one_of_the_choices(engine):
    choices = ["positive", "negative", "neutral \"maybe\"", "日本語", "a\nb"]
    outs = engine.generate(list(SAFE_PROMPTS[:4]), [_sampled(i, choice=choices) for i in range(4)])
    assert all(o.finish_reason == "stop" and o.text in choices for o in outs), [o.text for o in outs]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=3)], ids=["greedy", "seeded"])
def test_constrained_tokens_equal_unconstrained_ones_when_every_token_is_allowed(engine, sampling):
    base = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1, **sampling)
    # A random model often writes bytes that are not UTF-8, which no grammar allows: keep the
    # prompts whose unconstrained text is valid (so a choice can spell exactly its bytes).
    candidates = engine.generate([[t] for t in range(4, 124)], base)
    free = [(t + 4, o) for t, o in enumerate(candidates)
            if o.text and "\ufffd" not in o.text and len(engine.tokenizer.encode(o.text)) > 0
            and all(t < len(engine.tokenizer) - 4 or t >= len(engine.tokenizer) for t in o.token_ids)][:3]
    assert len(free) >= 2, [o.text for o in candidates]
    prompts = [[t] for t, _ in free]
    texts = [o.text for _, o in free]
    constrained = engine.generate(prompts, [base.replace(structured_output={"choice": [t, t + "!"]}) for t in texts])
    wide = engine.generate(prompts, base.replace(structured_output={"regex": r"[^\x00]*"}))
    for (_, f), c, w in zip(free, constrained, wide):
        assert c.token_ids == f.token_ids and w.token_ids == f.token_ids
        assert c.finish_reason == "length"
        # Log-probabilities are the raw distribution's, mask or not.
        assert [lp.logprob for lp in c.logprobs] == pytest.approx([lp.logprob for lp in f.logprobs], abs=1e-4)


def test_free_rows_in_a_mixed_batch_get_the_tokens_they_get_alone(engine):
    alone = engine.generate([SAFE_PROMPTS[0], SAFE_PROMPTS[1]], FREE)
    mixed = engine.generate([SAFE_PROMPTS[2], SAFE_PROMPTS[0], SAFE_PROMPTS[3], SAFE_PROMPTS[1]],
                            [_sampled(1, json=SCHEMAS["nested"]), FREE[0], _sampled(2, regex="[a-z]{3,20}"), FREE[1]])
    assert [mixed[1].token_ids, mixed[3].token_ids] == [alone[0].token_ids, alone[1].token_ids]
    assert [lp.logprob for lp in mixed[1].logprobs] == pytest.approx([lp.logprob for lp in alone[0].logprobs],
                                                                     abs=1e-4)
    jsonschema.validate(json.loads(mixed[0].text), SCHEMAS["nested"])
    assert re.fullmatch("[a-z]{3,20}", mixed[2].text)


def _preemption_run(model_dir, **engine_kw):
    eng = InferenceEngine(model_dir, device="cpu", **engine_kw)
    # A shared 32-token prefix (two full blocks: prefix-cache hits) and prompts longer than a chunk.
    prefix = [5 + (i * 7) % 300 for i in range(32)]
    prompts = [prefix + [11 + i, 40 + 3 * i, 9] * (1 + i % 3) for i in range(8)]
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "bb", "ccc"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "s": {"type": "string", "maxLength": 6}}, "required": ["k", "n", "s"]}
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=60, structured_output={"json": schema})
              if i % 2 == 0 else SamplingParams(temperature=0.9, seed=i, max_tokens=24, ignore_eos=True)
              for i in range(8)]
    outs = eng.generate(prompts, params)
    stats = eng.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and not eng.has_unfinished_requests()
    for out, p in zip(outs, params):
        assert PENDING not in out.token_ids
        if p.structured_output is not None:
            assert out.finish_reason == "stop"
            jsonschema.validate(json.loads(out.text), schema)
    preempted = sum(o.num_preemptions for o, p in zip(outs, params) if p.structured_output is not None)
    return [(o.token_ids, o.finish_reason) for o in outs], {**stats, "constrained_preemptions": preempted}


def test_constrained_rows_survive_preemption_chunked_prefill_and_prefix_caching(llama):
    roomy, _ = _preemption_run(llama, num_kv_blocks=64)
    tight = dict(num_kv_blocks=14, max_num_batched_tokens=16, block_size=16, enable_prefix_caching=True)
    squeezed, stats = _preemption_run(llama, **tight)
    assert stats["constrained_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert squeezed == roomy
    synchronous, _ = _preemption_run(llama, async_scheduling=False, **tight)
    assert synchronous == roomy


def test_grammar_end_is_a_stop_whose_token_is_not_in_the_text_and_max_tokens_a_length(engine):
    p = SamplingParams(temperature=0.8, seed=4, max_tokens=50, structured_output={"choice": ["alpha", "beta"]})
    out = engine.generate([SAFE_PROMPTS[0]], p)[0]
    assert out.finish_reason == "stop" and out.stop_reason == out.token_ids[-1]
    assert out.text in ("alpha", "beta") and out.token_ids[-1] in engine.engine.eos_ids
    streamed = "".join(delta for _, delta in engine.stream_generate(SAFE_PROMPTS[0], p))
    assert streamed == out.text
    # ignore_eos does not outlive the grammar: its end still stops the request.
    assert engine.generate([SAFE_PROMPTS[0]], p.replace(ignore_eos=True))[0].text == out.text
    cut = engine.generate([SAFE_PROMPTS[1]], _sampled(1, json=SCHEMAS["nested"]).replace(max_tokens=5))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5  # incomplete JSON, as documented


def test_grammars_that_do_not_compile_are_value_errors_naming_the_prompt_and_the_field(engine):
    bad = [{"json": {"type": "strin"}}, {"regex": "[a-"}, {"grammar": "root ::= undefined_rule"}]
    for so in bad:
        with pytest.raises(ValueError, match=rf"prompt 1: structured_output\.{next(iter(so))}: .*cannot be compiled"):
            engine.generate(["fine", "bad"], [SamplingParams(max_tokens=4), SamplingParams(structured_output=so)])
    with pytest.raises(StructuredOutputError):
        engine.add_request("bad", [3, 4], SamplingParams(structured_output=bad[0]))
    assert not engine.has_unfinished_requests()  # nothing was queued; the engine goes on
    assert engine.generate([SAFE_PROMPTS[0]], max_tokens=3, temperature=0)[0].finish_reason == "length"
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_output={"regex": "a+"})


def test_matchers_replay_output_tokens_when_out_of_sync_and_forks_are_independent(engine):
    import torch

    e = engine.engine
    params = _sampled(5, regex="(ab|cd)+x")
    a, b, c, d = (e.tokenizer.convert_tokens_to_ids(ch) for ch in "abcd")

    def allowed(grammar, outputs) -> set[int]:
        # The little of a Sequence that filling reads; its newest token is the one being sampled.
        seq = SimpleNamespace(grammar=grammar, is_finished=False, num_output_tokens=len(outputs) + 1,
                              token_ids=[1, *outputs, PENDING], output_token_ids=[*outputs, PENDING])
        mask = e.structured.fill_bitmask([0], [seq], 1)
        x = mask.apply(torch.zeros(2, e.model_args.vocab_size))
        return set(torch.isfinite(x[0]).nonzero().flatten().tolist())

    fresh = e.structured.new_grammar(params)
    assert fresh.accept(a) and fresh.accept(b)
    stale = e.structured.new_grammar(params)  # accepted nothing: filling must replay "ab" first
    after_ab = allowed(fresh, [a, b])
    assert allowed(stale, [a, b]) == after_ab and stale.num_accepted == 2
    # The unpacked bitmask is exactly what the matcher accepts, token by token.
    assert after_ab == {t for t in range(e.model_args.vocab_size) if fresh.fork().accept(t)}
    assert {a, c} <= after_ab and d not in after_ab
    child = fresh.fork()
    assert child.accept(c) and child.num_accepted == 3 and fresh.num_accepted == 2
    after_abc = allowed(child, [a, b, c])
    assert d in after_abc and not after_abc & {a, c} and allowed(fresh, [a, b]) == after_ab


def test_bitmask_fill_time_is_in_the_engine_stats(engine):
    before = engine.engine.stats()
    engine.generate([SAFE_PROMPTS[0]], _sampled(9, regex="[0-9]{3}"))
    after = engine.engine.stats()
    assert after["structured_steps"] > before["structured_steps"]
    assert after["bitmask_fill_s"] > before["bitmask_fill_s"] and after["bitmask_fill_ms_mean"] > 0
    assert after["bitmask_fill_ms_p99"] >= after["bitmask_fill_ms_p50"] > 0


@pytest.mark.slow
def test_qwen2_tokenizer_unicode_json_is_valid(tmp_path, shared_models_dir):
    """The real Qwen2 byte-level BPE (151k tokens, a 151,936-row embedding) on a tiny random model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model_factory

    src = shared_models_dir / "qwen2-tokenizer"
    if not src.is_dir():
        pytest.skip(f"{src} does not exist")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    config = model_factory._make_config("qwen2", tok, {"vocab_size": 151936, "hidden_size": 32,
                                                       "num_hidden_layers": 1, "intermediate_size": 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_factory._init_weights(model, 0, len(tok))
    model.save_pretrained(str(tmp_path))
    eng = InferenceEngine(str(tmp_path), device="cpu", num_kv_blocks=32)
    schema = {"type": "object", "properties": {
        "城市": {"type": "string", "minLength": 1, "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["naïve", "日本語", "emoji 🚀"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["城市", "tags", "n"]}
    outs = eng.generate(["你好，世界", "Once upon a time", "café"],
                        # Unseeded: the seeded sampler's hash noise over 151,936 tokens is slow on a CPU.
                        SamplingParams(temperature=1.0, max_tokens=80, structured_output={"json": schema}))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    choices = ["日本語", "naïve", "🚀🚀"]
    outs = eng.generate(["a", "b", "c"], SamplingParams(temperature=1.0, max_tokens=20,
                                                        structured_output={"choice": choices}))
    assert all(o.text in choices for o in outs)


# --- the device-side mask, alone --------------------------------------------------------------------------


def _grammar_mask(allowed, rows, num_rows, device="cpu"):
    """A GrammarMask from a [R, V] bool matrix of allowed tokens (packed as xgrammar packs its bitmask)."""
    import numpy as np
    import torch

    from pagedbatch.engine.structured import GrammarMask

    R, V = allowed.shape
    padded = np.zeros((R, -(-V // 32) * 32), dtype=bool)
    padded[:, :V] = allowed.numpy()
    bits = torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").view("<i4").astype(np.int32))
    table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).eq(0)
    return GrammarMask(torch.tensor(rows, device=device), bits.to(device), rows == list(range(num_rows)),
                       table.to(device))


def _mask_case(device="cpu"):
    import torch

    from pagedbatch.engine.sampler import SamplingBatch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 70, generator=gen) * 3
    allowed = torch.rand(2, 70, generator=gen) < 0.2
    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0.9, seed=1),
              SamplingParams(temperature=0.7, seed=2, top_k=5), SamplingParams(temperature=0)]
    batch = SamplingBatch.build(params, [[]] * 4, [[1]] * 4, [[]] * 4, 70, torch.device(device))
    batch.grammar_mask = _grammar_mask(allowed, [0, 2], 4, device)
    return logits.to(device), allowed, params, batch


def test_the_mask_binds_only_its_rows_keeps_raw_logprobs_and_reads_nothing_on_the_host(monkeypatch):
    import torch

    from pagedbatch.engine.sampler import Sampler, SamplingBatch

    logits, allowed, params, batch = _mask_case()
    before = logits.clone()
    free = Sampler()(logits, SamplingBatch.build(params, [[]] * 4, [[1]] * 4, [[]] * 4, 70, torch.device("cpu")))

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = Sampler()(logits, batch)
    monkeypatch.undo()
    tokens = out.token_ids.tolist()
    assert allowed[0, tokens[0]] and allowed[1, tokens[2]]
    assert tokens[0] == int(torch.where(allowed[0], logits[0], float("-inf")).argmax())
    assert [tokens[1], tokens[3]] == [free.token_ids[1].item(), free.token_ids[3].item()]
    assert torch.equal(logits, before)
    assert out.logprobs[0] == pytest.approx(float(logits[0].log_softmax(-1)[tokens[0]]))


@pytest.mark.gpu
def test_the_mask_on_cuda_matches_the_cpu_and_needs_no_sync():
    import torch

    from pagedbatch.engine.sampler import Sampler

    cpu_logits, _, _, cpu_batch = _mask_case()
    logits, _, _, batch = _mask_case("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Sampler()(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.token_ids.cpu(), Sampler()(cpu_logits, cpu_batch).token_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_constrained_outputs_on_the_gpu_are_valid_next_to_free_rows(llama, dtype):
    # The overlapped two-half launch with CUDA events, CUDA-graph decode and the pinned bitmask copy.
    prompts = [p for p in SAFE_PROMPTS[:4] for _ in range(2)]
    params = [_sampled(i, json=s) for i, s in enumerate(SCHEMAS.values())]
    params = [p for pair in zip(params, [FREE[0]] * 4) for p in pair]
    gpu = InferenceEngine(llama, device="cuda", dtype=dtype)
    outs = gpu.generate(prompts, params)
    for out, p in zip(outs, params):
        if p.structured_output is not None:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), p.structured_output.json)
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == p.max_tokens
    stats = gpu.engine.stats()
    assert stats["structured_steps"] > 0 and stats["free_blocks"] == stats["num_blocks"]


def test_a_tokenizer_that_cannot_be_mapped_or_none_is_an_error_naming_the_field():
    from pagedbatch.engine.structured import GrammarCompilerCache
    from pagedbatch.structured_output import StructuredOutputParams

    class Unmappable:  # no get_vocab: xgrammar cannot read it
        eos_token_id = 1

    for tokenizer, problem in [(Unmappable(), "tokenizer (Unmappable) cannot be mapped"), (None, "needs a tokenizer")]:
        cache = GrammarCompilerCache(tokenizer, 100, [1])
        with pytest.raises(StructuredOutputError, match=rf"^structured_output\.regex: .*{re.escape(problem)}"):
            cache.compile(StructuredOutputParams(regex="a+"))


@pytest.mark.slow
def test_tensor_parallel_engine_gives_the_same_constrained_tokens(llama, engine):
    # Sampling (and the mask) run on rank 0 only; the worker rank just runs its shard of the forward pass.
    params = [SamplingParams(temperature=0, max_tokens=200, structured_output={"json": s}) for s in SCHEMAS.values()]
    one = engine.generate(list(SAFE_PROMPTS[:4]), params)
    with InferenceEngine(llama, device="cpu", tensor_parallel_size=2) as tp:
        two = tp.generate(list(SAFE_PROMPTS[:4]), params)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert all(o.finish_reason == "stop" for o in two)


def test_length_bounded_strings_refuse_raw_control_characters(engine):
    # xgrammar 0.2.9 lets them into a maxLength string (its issue 800); the schema is compiled around that.
    import xgrammar

    from pagedbatch.structured_output import StructuredOutputParams

    compiled = engine.engine.structured.compiler.compile(StructuredOutputParams(json={"type": "string",
                                                                                       "maxLength": 3}))
    assert not xgrammar.GrammarMatcher(compiled).accept_string(b'"a\x14')
    ok = xgrammar.GrammarMatcher(compiled)
    assert ok.accept_string('"日本a"'.encode()) and ok.is_completed()
    assert not xgrammar.GrammarMatcher(compiled).accept_string('"abcd'.encode())


def test_n_samples_under_a_grammar_each_follow_it_with_their_own_matcher(engine):
    # The samples forked off one prompt share its KV blocks, not its matcher: each advances its own,
    # and sample j equals an n=1 request seeded sample_seed(seed, j) under the same constraint.
    from pagedbatch.sampling_params import sample_seed

    pattern = r"[a-z]{1,6}-[0-9]{1,3}"
    so = {"regex": pattern}
    forked = engine.generate([SAFE_PROMPTS[0]], _sampled(11, **so).replace(n=4))
    assert [r.sample_index for r in forked] == [0, 1, 2, 3]
    alone = engine.generate([SAFE_PROMPTS[0]] * 4, [_sampled(sample_seed(11, j), **so) for j in range(4)])
    for r, a in zip(forked, alone):
        assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), (r.text, r.finish_reason)
        assert r.token_ids == a.token_ids
    assert len({r.text for r in forked}) > 1  # the samples differ: their matchers are not shared
    assert engine.engine.stats()["forked_seqs"] >= 3
