"""The loader places every checkpoint tensor or refuses the checkpoint: nothing is dropped silently.

A tensor the model built from config.json has no place for (a bias of an
unsupported variant, a layer past num_hidden_layers, a feature added later)
would otherwise change the outputs without a word. Rotary ``inv_freq``
buffers, static activation ``input_scale``s and a tied checkpoint's
``lm_head.weight`` carry nothing the model needs and still load.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_factory import build_model
from pagedbatch.engine.models.config import ModelArgs
from pagedbatch.engine.models.loader import load_model


def _rewrite(model_dir, extra=(), **config):
    """Add tensors to a one-file checkpoint and keys to its config.json."""
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg_path = Path(model_dir) / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))
    return tensors


def _load(model_dir):
    return load_model(str(model_dir), ModelArgs.from_dir(str(model_dir)), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("llama"))


def test_unused_checkpoint_tensors_are_refused_naming_the_first_few(tmp_path):
    d = build_model("qwen2", tmp_path / "m")  # tied embeddings
    before = dict(_load(d).named_parameters())
    embed = load_file(str(Path(d) / "model.safetensors"))["model.embed_tokens.weight"]
    _rewrite(d, {"lm_head.weight": embed.clone(),
                 "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                 "model.layers.1.mlp.down_proj.input_scale": torch.ones(())})
    after = dict(_load(d).named_parameters())  # these carry nothing the model needs: still loaded
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    # Biases Qwen2 has no parameter for (transformers builds none either), and names no architecture uses.
    extra = {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(64) for i in range(2)}
    extra.update({f"model.layers.0.mlp.experts.{i}.weight": torch.zeros(4, 4) for i in range(6)})
    _rewrite(d, extra)
    with pytest.raises(ValueError, match=r"would not use: model\.layers\.0\.mlp\.experts\.0\.weight, .* and 3 more"):
        _load(d)


def test_layers_past_num_hidden_layers_are_refused(llama_dir, tmp_path):
    import shutil

    d = shutil.copytree(llama_dir, tmp_path / "m")
    _rewrite(d, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"would not use: model\.layers\.1\."):
        _load(d)


def test_qk_norm_weights_on_a_model_without_qk_norm_are_refused(llama_dir, tmp_path):
    import shutil

    d = shutil.copytree(llama_dir, tmp_path / "m")
    _rewrite(d, {"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(ValueError, match=r"would not use: model\.layers\.0\.self_attn\.q_norm\.weight"):
        _load(d)


def test_a_weight_scale_without_an_fp8_weight_is_refused(llama_dir, tmp_path):
    from fp8_checkpoints import write_fp8_checkpoint

    d = write_fp8_checkpoint(llama_dir, str(tmp_path / "fp8"), "ct-channel")
    _load(d)  # every scale pairs with its fp8 weight
    scales = Path(d) / "model-00002-of-00002.safetensors"
    tensors = load_file(str(scales))
    tensors["model.layers.0.input_layernorm.weight_scale"] = torch.ones(1)
    save_file(tensors, str(scales))
    index = Path(d) / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"]["model.layers.0.input_layernorm.weight_scale"] = scales.name
    index.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"would not use: model\.layers\.0\.input_layernorm\.weight_scale"):
        _load(d)


def test_a_config_without_a_required_key_or_with_a_non_boolean_bias_flag_is_named():
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4}
    ModelArgs.from_hf_dict(cfg)
    with pytest.raises(ValueError, match=r"config.json lacks 'intermediate_size', needed for LlamaForCausalLM"):
        ModelArgs.from_hf_dict({k: v for k, v in cfg.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match=r"mlp_bias in config.json must be true or false, got 'false'"):
        ModelArgs.from_hf_dict({**cfg, "mlp_bias": "false"})
