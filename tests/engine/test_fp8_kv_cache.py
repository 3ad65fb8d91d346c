"""The fp8 KV cache through the engine on the CPU (the torch reference path): options, sizing, the
checkpoint's scales, exactness across chunking, preemption and prefix caching, tensor parallel."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_factory import SAFE_PROMPTS, build_model
from pagedbatch import EngineConfig, InferenceEngine, SamplingParams
from pagedbatch.engine.attention.kv_quant import FP8_KV_DTYPE, check_kv_cache_device
from pagedbatch.engine.models.config import ModelArgs
from pagedbatch.engine.models.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SCALES = {0: (0.02, 0.05), 1: (0.015, 0.04)}  # per layer (k, v): the tiny qwen3's K reach ~4.5, V ~13


def _add_tensors(model_dir: str, tensors: dict) -> None:
    path = os.path.join(model_dir, "model.safetensors")
    weights = load_file(path)
    weights.update(tensors)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def scaled_dir(tmp_path_factory) -> str:
    """A tiny qwen3 whose checkpoint carries per-layer k_scale / v_scale (vLLM's names)."""
    d = build_model("qwen3", tmp_path_factory.mktemp("fp8-qwen3"))
    _add_tensors(d, {f"model.layers.{i}.self_attn.{n}_scale": torch.tensor(s)
                     for i, ks in SCALES.items() for n, s in zip("kv", ks)})
    return d


def _engine(model_dir, **kw) -> InferenceEngine:
    return InferenceEngine(model_dir, **{"device": "cpu", "dtype": "float32", "kv_cache_dtype": "fp8", **kw})


def _prompts(engine) -> list[list[int]]:
    return [engine.tokenizer(t)["input_ids"] for t in SAFE_PROMPTS]


def test_kv_cache_dtype_is_validated_with_actionable_messages():
    assert EngineConfig(model="m", kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3; got 'fp8_e5m2'"):
        EngineConfig(model="m", kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="'triton-basic' has no fp8 KV cache"):
        EngineConfig(model="m", kv_cache_dtype="fp8", attention_backend="triton-basic")


def test_fp8_cache_on_a_gpu_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*A100.*\(compute capability 8\.0\)"):
        check_kv_cache_device(FP8_KV_DTYPE, torch.device("cuda", 0))
    check_kv_cache_device(torch.bfloat16, torch.device("cuda", 0))  # the model's dtype: nothing to check
    check_kv_cache_device(FP8_KV_DTYPE, torch.device("cpu"))  # the reference path runs anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_device(FP8_KV_DTYPE, torch.device("cuda", 0))


def test_fp8_cache_holds_twice_the_tokens_of_bf16_in_the_same_memory(scaled_dir):
    sizes = {}
    for dtype, kv in (("bfloat16", "auto"), ("bfloat16", "fp8"), ("float32", "fp8")):
        runner = _engine(scaled_dir, dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_gb=0.01).engine.runner
        assert runner.kv_cache.dtype == (FP8_KV_DTYPE if kv == "fp8" else torch.bfloat16)
        sizes[dtype, kv] = (runner.bytes_per_block(), runner.num_blocks)
    assert sizes["bfloat16", "fp8"][0] * 2 == sizes["bfloat16", "auto"][0]
    assert sizes["bfloat16", "fp8"][1] // 2 == sizes["bfloat16", "auto"][1]  # floor(budget / bytes)
    assert sizes["float32", "fp8"] == sizes["bfloat16", "fp8"]  # 1 byte per element whatever the model dtype


def test_checkpoint_kv_scales_load_in_every_layout_and_per_head_scales_are_refused(tmp_path):
    d = build_model("llama", tmp_path / "m")
    args = ModelArgs.from_dir(d)
    _add_tensors(d, {"model.layers.0.self_attn.k_proj.output_scale": torch.tensor([0.25]),  # compressed-tensors
                     "model.layers.0.self_attn.v_proj.output_scale": torch.tensor([0.5]),
                     "model.layers.1.self_attn.kv_scale": torch.tensor(0.125)})  # one scale for K and V
    model = load_model(d, args, torch.float32, torch.device("cpu"))
    assert model.layers[0].self_attn.kv_scale.tolist() == [0.25, 0.5]
    assert model.layers[1].self_attn.kv_scale.tolist() == [0.125, 0.125]
    assert model.layers[1].self_attn.kv_scale.dtype == torch.float32 and model.kv_scales_loaded == {0, 1}
    _add_tensors(d, {"model.layers.1.self_attn.k_scale": torch.tensor([0.1, 0.2])})
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_scale' has shape \(2,\): one KV-cache "
                                         "scale per layer"):
        load_model(d, args, torch.float32, torch.device("cpu"))


def test_fp8_cache_without_checkpoint_scales_uses_1_and_warns(tiny_model, caplog):
    with caplog.at_level("WARNING"):
        runner = _engine(tiny_model("llama"), num_kv_blocks=8).engine.runner
    assert all(layer.self_attn.kv_scale.tolist() == [1.0, 1.0] for layer in runner.model.layers)
    assert "2 of 2 layers have no k_scale/v_scale" in caplog.text


def test_fp8_generation_is_exact_across_chunking_preemption_and_prefix_caching(scaled_dir):
    """Quantization is per element and deterministic, so a sequence's cache holds the same bytes however
    its prompt was chunked, recomputed after preemption or shared through the prefix cache."""
    alone = _engine(scaled_dir, enable_prefix_caching=False)
    prompts = _prompts(alone)
    shared = prompts[4] * 3  # a prefix of whole blocks shared by every prompt below
    batch = [shared + p for p in prompts]
    want = [alone.generate([p], GREEDY)[0].token_ids for p in batch]
    tight = _engine(scaled_dir, num_kv_blocks=12, max_num_batched_tokens=16)
    got = [o.token_ids for o in tight.generate(batch, GREEDY)]
    assert got == want
    stats = tight.engine.stats()
    assert stats["preemptions"] > 0, "the test meant to force preemption"
    assert tight.engine.block_manager.hit_tokens > 0, "the test meant to hit the prefix cache"


def test_fp8_cache_with_key_contiguous_v_blocks_gives_the_same_tokens(scaled_dir, monkeypatch):
    """kv_quant.FP8_V_KEY_CONTIGUOUS (on by default): the runner stores V blocks as [kv_heads, head_dim,
    block_size] for the Triton kernels (interpreted here), and nothing else changes: the same greedy tokens
    through chunked prefill, decode and preemption as with the usual layout."""
    pytest.importorskip("triton")
    from pagedbatch.engine.attention import kv_quant

    # Four prompts of 10-24 tokens and 8 new tokens each in five 16-token blocks: one preemption, at
    # half the interpreter's time of the six prompts the other tests use.
    kw = dict(attention_backend="triton", num_kv_blocks=5, max_num_batched_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    monkeypatch.setattr(kv_quant, "FP8_V_KEY_CONTIGUOUS", False)
    usual = _engine(scaled_dir, **kw)
    prompts = _prompts(usual)[:4]
    want = [o.token_ids for o in usual.generate(prompts, greedy)]
    assert usual.engine.runner.kv_caches[0][1].stride(1) != 1
    monkeypatch.setattr(kv_quant, "FP8_V_KEY_CONTIGUOUS", True)
    eng = _engine(scaled_dir, **kw)
    v = eng.engine.runner.kv_caches[0][1]
    assert v.stride(1) == 1 and v.shape == usual.engine.runner.kv_caches[0][1].shape  # the switch took
    assert [o.token_ids for o in eng.generate(prompts, greedy)] == want
    assert eng.engine.stats()["preemptions"] > 0, "the test meant to force preemption"


@pytest.mark.slow
def test_tp2_fp8_matches_one_process_with_replicated_scales(scaled_dir):
    one = _engine(scaled_dir)
    prompts = _prompts(one)
    want = [o.token_ids for o in one.generate(prompts, GREEDY)]
    with _engine(scaled_dir, tensor_parallel_size=2, num_kv_blocks=16, max_num_batched_tokens=16) as tp:
        assert [o.token_ids for o in tp.generate(prompts, GREEDY)] == want


@pytest.mark.gpu
def test_gpu_fp8_engine_doubles_the_blocks_and_decodes_under_cuda_graphs(scaled_dir):
    """The runner's profile gives an fp8 cache about twice the blocks of a bf16 one at the same memory budget,
    and decode steps run through the captured graphs (fp8 cache, device-side scales) to the requested length."""
    import gc

    blocks = {}
    for kv in ("auto", "fp8"):
        eng = InferenceEngine(scaled_dir, device="cuda", dtype="bfloat16", kv_cache_dtype=kv,
                              gpu_memory_utilization=0.05, max_num_batched_tokens=512)
        runner = eng.engine.runner
        blocks[kv] = runner.num_blocks
        if kv == "fp8":
            assert runner.kv_cache.dtype == FP8_KV_DTYPE and runner.graphs is not None
            outs = eng.generate(_prompts(eng) * 3, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
            assert all(len(o.token_ids) == 40 for o in outs)
            assert runner.model.layers[1].self_attn.kv_scale.tolist() == pytest.approx(list(SCALES[1]))
        del eng, runner
        gc.collect()
        torch.cuda.empty_cache()
    assert blocks["fp8"] >= 1.9 * blocks["auto"], blocks
