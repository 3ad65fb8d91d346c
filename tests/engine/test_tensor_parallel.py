"""Tensor parallel on the CPU (gloo, float32): greedy tokens equal Hugging Face's, and each rank holds only its shard.

Every engine here has two ranks: this process and one worker process. The
cache is small and the token budget low, so a batch of all prompts is
chunked and preempted, while one prompt at a time runs undisturbed; both
must match transformers token for token.
"""
import pytest
import torch

from model_factory import KINDS, build_model, hf_greedy
from pagedbatch import EngineConfig, InferenceEngine, SamplingParams
from pagedbatch.engine.models.config import ModelArgs
from pagedbatch.engine.models.loader import load_model
from pagedbatch.engine.models.sharding import TPShard, check_tensor_parallel, split

MAX_NEW = 24
TEXTS = ["Hello", "The quick brown fox jumps over", "AI is", "人工智能的未来是什么样的",
         "def add(a, b):\n    return", "Once upon a time, in a land far far away, there lived a"]
# One KV head for two ranks (replicated), and a vocabulary and an intermediate
# size that two ranks cannot split evenly (the last shard is padded).
ODD = dict(num_key_value_heads=1, vocab_size=381, intermediate_size=129)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def tp_engine(model_dir, **kw):
    kw = {"dtype": "float32", "device": "cpu", "tensor_parallel_size": 2, "block_size": 16, "num_kv_blocks": 10,
          "max_num_batched_tokens": 16, **kw}
    return InferenceEngine(model_dir, **kw)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Per kind: (model dir, prompts, HF greedy outputs, a TP-2 engine), built once; engines shut down at the end."""
    cache = {}

    def get(kind):
        if kind not in cache:
            name, overrides = (kind, {}) if kind in KINDS else ("llama3", ODD)
            d = build_model(name, tmp_path_factory.mktemp(kind), **overrides)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(d)
            prompts = [tok(t)["input_ids"] for t in TEXTS]
            cache[kind] = (d, prompts, hf_greedy(d, prompts, MAX_NEW), tp_engine(d))
        return cache[kind]

    yield get
    for *_, engine in cache.values():
        engine.shutdown()


def _check_blocks_free(engine):
    stats = engine.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"], "blocks leaked"
    return stats


@pytest.mark.parametrize("kind", [*KINDS, "replicated-kv-padded"])
def test_tp2_greedy_matches_hf_batched_with_chunking_and_preemption(case, kind):
    d, prompts, ref, engine = case(kind)
    before = engine.engine.stats()["preemptions"]
    got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert got == ref
    stats = _check_blocks_free(engine)
    assert stats["preemptions"] > before, "the test meant to force preemption"


@pytest.mark.parametrize("kind", ["llama", "qwen3", "replicated-kv-padded"])
def test_tp2_greedy_matches_hf_one_prompt_at_a_time(case, kind):
    d, prompts, ref, engine = case(kind)
    for p, want in list(zip(prompts, ref))[::2]:
        assert engine.generate([p], GREEDY)[0].token_ids == want


def test_tp2_prefix_caching_is_exact_across_preemption(case):
    d, prompts, _, engine = case("qwen3")
    shared = prompts[5] * 2  # a common prefix of two blocks
    batch = [shared + p for p in prompts[:4]]
    ref = hf_greedy(d, batch, MAX_NEW)
    hits = engine.engine.block_manager.hit_tokens
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == ref
    _check_blocks_free(engine)
    assert engine.engine.block_manager.hit_tokens > hits


def test_tp2_logprobs_and_seeded_sampling_agree_with_one_process(case):
    d, prompts, _, engine = case("qwen2")
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)]
    tp = engine.generate(prompts[:2], params)
    one = InferenceEngine(d, dtype="float32", device="cpu").generate(prompts[:2], params)
    assert [o.token_ids for o in tp] == [o.token_ids for o in one]
    got = [(lp.token_id, lp.logprob) for lp in tp[0].logprobs]
    want = [(lp.token_id, lp.logprob) for lp in one[0].logprobs]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-4)


def test_each_rank_reads_only_its_shard_of_the_checkpoint(case):
    d, _, _, engine = case("replicated-kv-padded")
    args = ModelArgs.from_dir(d)
    from safetensors import safe_open

    with safe_open(f"{d}/model.safetensors", framework="pt") as f:
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    total = sum(4 * torch.Size(s).numel() for s in sizes.values())
    # Replicated on both ranks: the norms and the single KV head.
    replicated = sum(4 * torch.Size(s).numel() for n, s in sizes.items()
                     if "norm" in n or "k_proj" in n or "v_proj" in n)
    per_rank = engine.engine.runner.bytes_read_per_rank
    assert len(per_rank) == 2
    assert sum(per_rank) == total + replicated
    assert all(b < 0.6 * total for b in per_rank)
    # Rank 0's own parameters are its slice: 2 of 4 query heads, 65 of 129 MLP rows, 191 of 381 vocabulary rows.
    model = engine.engine.runner.model
    attn = model.layers[0].self_attn
    hd = args.head_dim
    assert attn.qkv_proj_weight.shape == ((2 + 1 + 1) * hd, args.hidden_size)
    assert attn.o_proj_weight.shape == (args.hidden_size, 2 * hd)
    assert model.layers[0].mlp.gate_up_proj_weight.shape == (2 * 65, args.hidden_size)
    assert model.embed_tokens.shape == (191, args.hidden_size)


class _NoComm:
    """Stands in for a TP group when only the loaded weights are inspected."""

    def all_reduce(self, x):
        raise AssertionError("not run")


@pytest.mark.parametrize("kind", ["qwen2", "replicated-kv-padded"])
def test_shards_are_slices_of_the_whole_model_also_for_dummy_weights(case, kind):
    d, *_ = case(kind)
    args = ModelArgs.from_dir(d)
    for fmt in ("safetensors", "dummy"):
        whole = dict(load_model(d, args, torch.float32, torch.device("cpu"), load_format=fmt).named_parameters())
        hd, kv = args.head_dim, args.num_kv_heads
        for rank in range(2):
            part = load_model(d, args, torch.float32, torch.device("cpu"), load_format=fmt,
                              shard=TPShard(rank, 2), comm=_NoComm())
            p = dict(part.named_parameters())
            q = args.num_heads * hd
            qkv = whole["layers.1.self_attn.qkv_proj_weight"]
            heads = slice(rank * q // 2, (rank + 1) * q // 2)
            kv_rows = slice(0, kv * hd) if kv == 1 else slice(rank * kv * hd // 2, (rank + 1) * kv * hd // 2)
            want = torch.cat([qkv[:q][heads], qkv[q : q + kv * hd][kv_rows], qkv[q + kv * hd :][kv_rows]])
            assert torch.equal(p["layers.1.self_attn.qkv_proj_weight"], want)
            o_proj = whole["layers.1.self_attn.o_proj_weight"]
            assert torch.equal(p["layers.1.self_attn.o_proj_weight"], o_proj[:, heads])
            start, count, local = split(args.intermediate_size, TPShard(rank, 2))
            down = p["layers.0.mlp.down_proj_weight"]
            assert torch.equal(down[:, :count], whole["layers.0.mlp.down_proj_weight"][:, start : start + count])
            assert not down[:, count:].any(), "padding columns are zero"
            start, count, local = split(args.vocab_size, TPShard(rank, 2))
            assert torch.equal(p["embed_tokens"][:count], whole["embed_tokens"][start : start + count])
            assert torch.equal(p["norm.weight"], whole["norm.weight"])


def test_qwen_v1_fused_c_attn_is_split_per_rank(tmp_path):
    from test_qwen_v1 import qwen2_to_qwen_v1

    src = build_model("qwen2", tmp_path / "q2", num_key_value_heads=4, tie_word_embeddings=False)
    v1 = tmp_path / "v1"
    qwen2_to_qwen_v1(src, v1)
    a2, a1 = ModelArgs.from_dir(src), ModelArgs.from_dir(str(v1))
    for rank in range(2):
        kw = dict(shard=TPShard(rank, 2), comm=_NoComm())
        ours = dict(load_model(str(v1), a1, torch.float32, torch.device("cpu"), **kw).named_parameters())
        ref = dict(load_model(src, a2, torch.float32, torch.device("cpu"), **kw).named_parameters())
        assert ours.keys() == ref.keys()
        for name in ours:
            assert torch.equal(ours[name], ref[name]), name


def test_bad_tensor_parallel_sizes_are_refused_naming_the_option(case):
    args = ModelArgs.from_dir(case("llama")[0])  # 4 heads, 2 KV heads
    for tp, words in ((3, "4 attention heads"), (8, "4 attention heads")):
        with pytest.raises(ValueError, match=f"tensor_parallel_size {tp} must divide the model's {words}"):
            check_tensor_parallel(args, tp)
    check_tensor_parallel(args, 4)  # 2 KV heads, each on two ranks
    import dataclasses

    with pytest.raises(ValueError, match="tensor_parallel_size 4 must divide the model's 6 KV heads"):
        check_tensor_parallel(dataclasses.replace(args, num_heads=12, num_kv_heads=6), 4)
    with pytest.raises(ValueError, match="must be a multiple of the model's 3 KV heads"):
        check_tensor_parallel(dataclasses.replace(args, num_heads=12, num_kv_heads=3), 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
            EngineConfig(model="m", tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        InferenceEngine(case("llama")[0], device="cpu", tensor_parallel_size=3)  # refused before any worker starts


def test_tp2_n_samples_share_the_prompt_and_equal_one_process(case):
    # The copy-on-write copies travel to the worker with the step inputs: a worker that skipped them would
    # attend to an empty block for the prompt's tail and give other tokens.
    d, prompts, ref, engine = case("qwen2")
    params = [SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=8, ignore_eos=True)]
    before = engine.engine.stats()
    tp = engine.generate(prompts[4:6], params)
    one = InferenceEngine(d, dtype="float32", device="cpu", num_kv_blocks=64).generate(prompts[4:6], params)
    assert [o.token_ids for o in tp] == [o.token_ids for o in one]
    assert [o.token_ids for o in tp[:3]] == [ref[4][:8]] * 3
    stats = _check_blocks_free(engine)
    assert stats["forked_seqs"] - before["forked_seqs"] == 4
    assert stats["cow_block_copies"] > before["cow_block_copies"]
