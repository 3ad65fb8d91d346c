"""``quantization``: validated in EngineConfig, taken as a keyword by the Python API."""
import pytest

from pagedbatch import EngineConfig, InferenceEngine, SamplingParams
from pagedbatch.engine.models.fp8 import FP8


def test_engine_config_accepts_fp8_or_none_and_names_the_field_otherwise():
    assert EngineConfig(model="m").quantization is None
    assert EngineConfig.from_dict({"model": "m", "quantization": "fp8"}).quantization == "fp8"
    for bad in ("int4", "FP8", ""):
        with pytest.raises(ValueError, match=r"quantization must be None .* or one of fp8; got"):
            EngineConfig(model="m", quantization=bad)


def test_api_keyword_quantizes_the_decoder_linears_and_nothing_else(tiny_model):
    with InferenceEngine(tiny_model("qwen3"), device="cpu", quantization="fp8", num_kv_blocks=8) as engine:
        assert engine.config.quantization == "fp8" and engine.engine.quantization == "fp8"
        params = dict(engine.engine.runner.model.named_parameters())
        fp8 = sorted(n for n, p in params.items() if p.dtype == FP8)
        assert fp8 == sorted(f"layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.qkv_proj_weight", "self_attn.o_proj_weight", "mlp.gate_up_proj_weight", "mlp.down_proj_weight"))
        assert params["embed_tokens"].dtype == params["layers.0.self_attn.q_norm.weight"].dtype != FP8
        out = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
