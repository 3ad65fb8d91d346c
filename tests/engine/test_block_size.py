"""The KV block size: 64 tokens under the Triton attention backend on a GPU (a block per decode tile), 16
elsewhere, unless the config names one; the engine settles it before its runner and block manager are built."""
import pytest

from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.config import EngineConfig, default_block_size
from pagedbatch.engine import llm_engine


@pytest.mark.parametrize("backend,device,want", [
    ("auto", "cuda", 64), ("triton", "cuda", 64), ("torch", "cuda", 16), ("triton-basic", "cuda", 16),
    ("auto", "cpu", 16), ("triton", "cpu", 16), ("torch", "cpu", 16)])
def test_default_block_size_is_the_decode_tile_under_triton_on_a_gpu_else_16(backend, device, want):
    assert default_block_size(backend, device) == want


def test_config_leaves_the_block_size_to_the_engine_and_checks_a_given_one():
    assert EngineConfig(model="m").block_size is None
    assert EngineConfig(model="m", block_size=32).block_size == 32
    for bad in (8, 17, 48, 512, True, 16.0, "16"):
        with pytest.raises(ValueError, match="block_size must be a power of two between 16 and 256"):
            EngineConfig(model="m", block_size=bad)


def test_engine_settles_the_default_before_building_its_cache(tiny_model, monkeypatch):
    model = tiny_model("llama")
    prompts = [[5, 9, 14, 3] * 5, [7, 2, 11] * 9]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cpu = InferenceEngine(model, device="cpu")
    assert cpu.engine.config.block_size == 16 and cpu.engine.stats()["block_size"] == 16
    want = [o.token_ids for o in cpu.generate(prompts, greedy)]

    seen = []
    monkeypatch.setattr(llm_engine, "default_block_size", lambda backend, device: seen.append((backend, device)) or 32)
    eng = InferenceEngine(model, device="cpu")
    assert seen == [("auto", "cpu")]
    assert eng.engine.config.block_size == 32 and eng.engine.runner.block_size == 32
    assert eng.engine.block_manager.block_size == 32 and eng.engine.runner.kv_caches[0][0].shape[1] == 32
    assert [o.token_ids for o in eng.generate(prompts, greedy)] == want

    pinned = InferenceEngine(model, device="cpu", block_size=16)  # a size the config names is kept
    assert pinned.engine.stats()["block_size"] == 16 and len(seen) == 1
