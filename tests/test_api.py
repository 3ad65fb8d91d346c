"""The Python API: stopping rules, streaming, and clear errors for bad input."""
import itertools
import json
import shutil

import pytest

from model_factory import build_model
from pagedbatch import InferenceEngine, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("api-llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return InferenceEngine(model_dir, device="cpu")


GREEDY = dict(temperature=0, max_tokens=32, ignore_eos=True)


def greedy(engine, prompt="Once upon a time", **kw):
    return engine.generate([prompt], SamplingParams(**{**GREEDY, **kw}))[0]


def test_generate_returns_one_result_per_prompt_with_counts_and_timings(engine):
    outs = engine.generate(["Hello", "AI is", [5, 6, 7]], max_tokens=5, temperature=0)
    assert len(outs) == 3
    for o in outs:
        assert o.finished and o.finish_reason in ("stop", "length")
        assert 1 <= o.output_tokens <= 5 and o.prompt_tokens == len(o.prompt_token_ids)
        t = o.timings
        assert 0 <= t.queue_s <= t.ttft_s <= t.latency_s
    assert outs[2].prompt_token_ids == [5, 6, 7]


def test_max_tokens_ends_with_length(engine):
    o = greedy(engine, max_tokens=7)
    assert o.output_tokens == 7 and o.finish_reason == "length"


def test_stop_token_id_ends_at_its_first_occurrence(engine):
    ref = greedy(engine).token_ids
    stop = ref[5]
    o = greedy(engine, stop_token_ids=[stop])
    first = ref.index(stop)
    assert o.token_ids == ref[: first + 1]
    assert o.finish_reason == "stop" and o.stop_reason == stop


def test_stop_string_is_cut_from_the_text(engine):
    ref = greedy(engine)
    text = ref.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    assert needle
    o = greedy(engine, stop=[needle])
    assert o.finish_reason == "stop" and o.stop_reason == needle
    assert o.text == text[: text.index(needle)]
    assert needle not in o.text


def test_min_tokens_holds_back_stop_strings_too(engine):
    # As in vLLM: before min_tokens no stop string ends the request (it only held back EOS and stop_token_ids).
    ref = greedy(engine)
    needle = ref.text[:4].strip() or ref.text[:4]
    early = greedy(engine, stop=[needle])
    assert early.finish_reason == "stop" and early.output_tokens < 10
    o = greedy(engine, stop=[needle], min_tokens=10)
    assert o.output_tokens >= 10
    assert o.text.startswith(ref.text[: len(early.text) + len(needle)])  # the early occurrence stayed in the text
    if o.finish_reason == "stop":  # a later occurrence may still end it, cut as usual
        assert ref.text.startswith(o.text) and ref.text[len(o.text):].startswith(needle)


def test_min_tokens_suppresses_stop_tokens_until_reached(engine):
    ref = greedy(engine).token_ids
    stop = ref[1]
    o = greedy(engine, stop_token_ids=[stop], min_tokens=10)
    assert o.output_tokens >= 10
    assert stop not in o.token_ids[:10]
    assert o.finish_reason in ("stop", "length")


def test_eos_stops_unless_ignore_eos(model_dir):
    eng = InferenceEngine(model_dir, device="cpu")
    ref = greedy(eng).token_ids
    eos = ref[4]
    eng.engine.eos_ids = {eos}  # pretend the model's EOS is a token it emits early
    eng.engine.runner.eos_ids = [eos]
    stopped = greedy(eng, ignore_eos=False)
    assert stopped.token_ids == ref[: ref.index(eos) + 1] and stopped.finish_reason == "stop"
    assert greedy(eng, ignore_eos=True).token_ids == ref


def test_penalties_change_greedy_output_and_repetition_is_discouraged(engine):
    ref = greedy(engine, max_tokens=32).token_ids
    pen = greedy(engine, max_tokens=32, presence_penalty=2.0, frequency_penalty=2.0).token_ids
    assert len(set(pen)) >= len(set(ref))
    rep = greedy(engine, max_tokens=32, repetition_penalty=5.0).token_ids
    assert rep != ref or len(set(ref)) == len(ref)


def test_logprobs_are_returned_for_each_token(engine):
    o = greedy(engine, max_tokens=4, logprobs=3)
    assert len(o.logprobs) == 4
    for lp, tok in zip(o.logprobs, o.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[-1][1]
        assert lp.top[0][0] == tok  # greedy picks the most likely token


def test_stream_generate_chinese_deltas_join_to_final_text(engine):
    ids, deltas = [], []
    for tok, delta in engine.stream_generate("AI 的未来是", max_tokens=40, temperature=0, ignore_eos=True):
        ids.append(tok)
        deltas.append(delta)
    final = engine.generate(["AI 的未来是"], max_tokens=40, temperature=0, ignore_eos=True)[0]
    assert ids == final.token_ids
    joined = "".join(deltas)
    decoded = engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert joined == final.text == decoded
    # A random model emits byte tokens that are invalid UTF-8 on their own, so
    # decode() itself may contain U+FFFD; streaming must never add one by
    # splitting a multi-byte character between deltas.
    assert sum(d.count("\ufffd") for d in deltas) == decoded.count("\ufffd")



def test_stream_generate_stopped_early_frees_blocks(engine):
    gen = engine.stream_generate("Hello", max_tokens=50, temperature=0)
    next(gen)
    gen.close()
    s = engine.engine.stats()
    assert s["free_blocks"] == s["num_blocks"] and not engine.has_unfinished_requests()


def test_too_long_request_ends_with_error_and_others_complete(model_dir):
    eng = InferenceEngine(model_dir, device="cpu", max_model_len=64)
    outs = eng.generate(["Hello", "x " * 100, "AI is"], max_tokens=8, temperature=0)
    assert outs[1].finish_reason == "error" and "exceeds the model's maximum length of 64" in outs[1].error
    assert outs[1].text == "" and outs[1].token_ids == []
    assert outs[0].finish_reason in ("length", "stop") and outs[2].output_tokens >= 1


def test_request_larger_than_whole_cache_ends_with_error(model_dir):
    eng = InferenceEngine(model_dir, device="cpu", num_kv_blocks=2, block_size=16)
    outs = eng.generate(["Hello", "Hello"], [SamplingParams(max_tokens=5), SamplingParams(max_tokens=100)])
    assert outs[0].finish_reason in ("length", "stop")
    assert outs[1].finish_reason == "error" and "whole KV cache (32 tokens)" in outs[1].error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(top_k=-3), "top_k must be"),
        (dict(n=0), "n must be >= 1"),
        (dict(n=2.0), "n must be an integer"),
    ],
)
def test_bad_sampling_values_name_the_field(engine, kwargs, message):
    with pytest.raises(ValueError, match="prompt 0: " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        engine.generate(["Hello"], **kwargs)


def test_generate_returns_samples_prompt_major_for_mixed_n(engine):
    prompts = ["Hello", [5, 6, 7], "AI is"]
    params = [SamplingParams(n=2, max_tokens=3, seed=1), SamplingParams(max_tokens=3), {"n": 3, "max_tokens": 3}]
    outs = engine.generate(prompts, params)
    assert [(o.prompt_token_ids, o.sample_index) for o in outs] == [
        (outs[0].prompt_token_ids, 0), (outs[0].prompt_token_ids, 1), ([5, 6, 7], 0),
        (outs[3].prompt_token_ids, 0), (outs[3].prompt_token_ids, 1), (outs[3].prompt_token_ids, 2)]
    assert outs[0].prompt_token_ids != outs[3].prompt_token_ids
    uniform = engine.generate(["Hello", "AI is"], n=2, max_tokens=3, temperature=0)
    assert [o.sample_index for o in uniform] == [0, 1, 0, 1]
    assert uniform[0].token_ids == uniform[1].token_ids and uniform[2].token_ids == uniform[3].token_ids


def test_stream_generate_refuses_several_samples(engine):
    with pytest.raises(ValueError, match="stream_generate streams one sample; got n=2"):
        next(engine.stream_generate("Hello", n=2, max_tokens=3))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompts,message", [
    (None, "got None"), (5, "got int 5"), (b"Hello", "got bytes b'Hello'"), ({"Hello"}, "got set"),
    ({"prompt": "Hello"}, "got dict"),
])
def test_prompts_of_an_unaccepted_type_are_a_type_error_naming_them(engine, prompts, message):
    with pytest.raises(TypeError, match=r"prompts must be a string or a list \(or tuple\) of token ids for one "
                                        r"prompt, or a list \(or tuple\) of such prompts for a batch; " + message):
        engine.generate(prompts, max_tokens=3)
    assert not engine.has_unfinished_requests()


def test_a_tuple_is_read_as_a_list_of_token_ids_or_of_prompts(engine):
    params = dict(max_tokens=4, temperature=0, ignore_eos=True)
    one = engine.generate([[5, 6, 7]], **params)[0].token_ids
    assert [o.token_ids for o in engine.generate((5, 6, 7), **params)] == [one]
    assert [o.token_ids for o in engine.generate(([5, 6, 7], (5, 6, 7)), **params)] == [one, one]
    assert [o.token_ids for o in engine.generate((p for p in ["Hello", (5, 6, 7)]), **params)][1] == one
    assert list(t for t, _ in engine.stream_generate((5, 6, 7), **params)) == one


def test_numpy_arrays_and_tensors_of_token_ids_are_prompts(engine):
    import numpy as np
    import torch

    params = dict(max_tokens=4, temperature=0, ignore_eos=True)
    one = engine.generate([[5, 6, 7]], **params)[0].token_ids
    assert [o.token_ids for o in engine.generate(np.array([5, 6, 7]), **params)] == [one]
    assert [o.token_ids for o in engine.generate(torch.tensor([[5, 6, 7], [5, 6, 7]]), **params)] == [one, one]
    assert [o.token_ids for o in engine.generate([np.array([5, 6, 7]), "Hello"], **params)][0] == one
    assert list(t for t, _ in engine.stream_generate(torch.tensor([5, 6, 7]), **params)) == one


def test_stream_generate_raises_for_a_request_that_cannot_run_at_the_call(engine):
    # The docstring's promise; these were raised only at the first next().
    with pytest.raises(ValueError, match="exceeds the model's maximum length"):
        engine.stream_generate("Hello", max_tokens=10**6)
    with pytest.raises(ValueError, match="regex"):
        engine.stream_generate("Hello", max_tokens=3, structured_output={"regex": "[a-"})
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt,message", [
    (None, "got None"), (5, "got int 5"), (["Hello", "AI is"], r"got a batch of 2 prompts \(use generate"),
])
def test_stream_generate_refuses_anything_but_one_prompt_at_the_call(engine, prompt, message):
    with pytest.raises(TypeError, match="stream_generate takes one prompt, a string or a list .*" + message):
        engine.stream_generate(prompt, max_tokens=3)  # raises at the call, before any next()
    assert not engine.has_unfinished_requests()


def test_empty_prompt_is_rejected_naming_its_index(engine):
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        engine.generate(["Hello", ""], max_tokens=3)
    assert not engine.has_unfinished_requests()  # nothing was queued


def test_out_of_vocab_token_ids_are_rejected(engine):
    with pytest.raises(ValueError, match=r"prompt 0: prompt token ids must be integers in \[0, "):
        engine.generate([[1, 2, 10**9]], max_tokens=3)


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        InferenceEngine(str(tmp_path / "nope"))


def test_unsupported_architecture_lists_supported_ones(model_dir, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model architecture.*supported: LlamaForCausalLM.*Qwen3ForCausalLM"):
        InferenceEngine(str(d))


def test_pickle_weights_are_refused_unless_allowed(model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = copy_without_weights(model_dir, tmp_path / "bin")
    torch.save(load_file(str(next(model_dir_files(model_dir, ".safetensors")))), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights"):
        InferenceEngine(str(d))
    eng = InferenceEngine(str(d), allow_pickle_weights=True, device="cpu")
    ref = InferenceEngine(model_dir, device="cpu")
    assert greedy(eng).token_ids == greedy(ref).token_ids


def model_dir_files(model_dir, suffix=""):
    from pathlib import Path

    return (p for p in sorted(Path(model_dir).iterdir()) if p.name.endswith(suffix))


def copy_without_weights(model_dir, dest):
    """config, tokenizer and generation config of a model directory, no .safetensors."""
    dest.mkdir()
    for f in model_dir_files(model_dir):
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dest / f.name)
    return dest


def test_dummy_load_format_needs_only_config(model_dir, tmp_path):
    d = copy_without_weights(model_dir, tmp_path / "cfg-only")
    eng = InferenceEngine(str(d), load_format="dummy", device="cpu")
    assert eng.generate(["Hello"], max_tokens=3, ignore_eos=True)[0].output_tokens == 3


def test_text_is_the_same_with_or_without_stop_strings_and_streaming_on_a_sentencepiece_model(shared_models_dir):
    # stories260k's tokenizer is sentencepiece: decoded alone, the first output token lost its leading space
    # on the plain path only ('and Tom were' against ' and Tom were' with a stop string or streamed).
    path = shared_models_dir / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    eng = InferenceEngine(str(path), device="cpu")
    plain = eng.generate("Lily", max_tokens=5, temperature=0)[0].text
    with_stop = eng.generate("Lily", max_tokens=5, temperature=0, stop="zzz")[0].text
    streamed = "".join(t for _, t in eng.stream_generate("Lily", max_tokens=5, temperature=0))
    assert plain == with_stop == streamed and plain.startswith(" ")


def test_streams_and_generate_calls_interleaved_on_one_engine_each_get_all_their_outputs(engine):
    # Each loop used to drop the outputs of requests it was not waiting for: a generate run while a stream was
    # open ate the stream's tokens and its final output (the stream then spun forever), and two streams side
    # by side garbled each other.
    def alone(prompt, n):
        return [t for t, _ in engine.stream_generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)]

    want_a, want_b = alone("Once upon a time", 12), alone("Hello", 9)
    want_gen = engine.generate("AI is", max_tokens=20, temperature=0, ignore_eos=True)[0].token_ids
    a = engine.stream_generate("Once upon a time", max_tokens=12, temperature=0, ignore_eos=True)
    b = engine.stream_generate("Hello", max_tokens=9, temperature=0, ignore_eos=True)
    got_a, got_b = [next(a)[0]], [next(b)[0]]
    assert engine.generate("AI is", max_tokens=20, temperature=0, ignore_eos=True)[0].token_ids == want_gen
    for x, y in itertools.zip_longest(a, b):
        if x is not None:
            got_a.append(x[0])
        if y is not None:
            got_b.append(y[0])
    assert (got_a, got_b) == (want_a, want_b)
    # The caller's own requests: generate steps past them, step() still hands their outputs out.
    engine.add_request("mine", "Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.generate("AI is", max_tokens=8, temperature=0)
    seen = []
    while engine.has_unfinished_requests() or not seen:
        seen += [o for o in engine.step() if o.request_id == "mine" and o.finished]
    assert len(seen) == 1 and seen[0].token_ids == want_b[:3]
    assert not engine._mailboxes and not engine._unclaimed


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named_in_the_error(model_dir, shared_models_dir, caplog):
    # Another model's tokenizer gives ids past the embedding: every prompt failed with a message about
    # "prompt token ids" (in jobs, blamed on the template), never naming the tokenizer.
    tok = shared_models_dir / "qwen2-tokenizer"
    if not tok.is_dir():
        pytest.skip(f"{tok} not present")
    with caplog.at_level("WARNING"):
        eng = InferenceEngine(model_dir, device="cpu", tokenizer=str(tok))
    assert "more than the model's vocabulary" in caplog.text
    with pytest.raises(ValueError, match=r"prompt 0: the tokenizer encodes this text to token ids \[.*past the "
                                         r"model's vocabulary of \d+: is it this model's tokenizer\?"):
        eng.generate("Hello world, how are you", max_tokens=2)
