"""The tiny test models: every kind builds, reloads, and decodes greedily
with wide margins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_factory
from model_factory import KINDS, SAFE_PROMPTS


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reloads_with_auto_classes(tiny_model, kind):
    model_dir = tiny_model(kind)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] > len(tokenizer)
    assert (Path(model_dir) / "generation_config.json").exists()
    # the reloaded tokenizer is the one we built, whatever class transformers picks
    fresh = model_factory.build_tokenizer(Path(model_dir) / "tok-copy")
    text = "Hello 你好 world 🙂\n  def f(x): return x"
    assert tokenizer(text).input_ids == fresh(text).input_ids
    assert len(tokenizer) == len(fresh)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    ids = torch.tensor([tokenizer("Hello").input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], config["vocab_size"])


def test_kind_specific_config(tiny_model):
    cfg = {k: json.loads((Path(tiny_model(k)) / "config.json").read_text()) for k in KINDS}
    assert cfg["llama3"]["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["qwen2"]["tie_word_embeddings"] is True
    assert cfg["qwen3"]["head_dim"] == 32 and cfg["qwen3"]["hidden_size"] // cfg["qwen3"]["num_attention_heads"] == 16
    assert cfg["mistral"]["sliding_window"] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2"), dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_llama3_rope_scaling_changes_some_frequencies(tiny_model):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    scaled = AutoModelForCausalLM.from_pretrained(tiny_model("llama3"), dtype=torch.float32)
    f0, f1 = plain.model.rotary_emb.inv_freq, scaled.model.rotary_emb.inv_freq
    same = torch.isclose(f0, f1)
    assert same.any() and not same.all()


def test_tokenizer_is_deterministic_and_has_chat_template(tmp_path):
    a = model_factory.build_tokenizer(tmp_path / "a")
    model_factory._tokenizer_json_cache = None  # force a second training run
    b = model_factory.build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.get_vocab() == b.get_vocab()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    text = reloaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s>") and text.endswith("<|assistant|>\n")
    assert [reloaded.bos_token, reloaded.eos_token, reloaded.pad_token] == ["<s>", "</s>", "<pad>"]


def test_shard_option_writes_an_index_and_several_shards(tiny_model):
    model_dir = Path(tiny_model("llama", shard=True))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    whole = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    for (name, p), (_, q) in zip(sharded.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(p, q), name


def test_hf_greedy_returns_exactly_max_new_tokens(tiny_model):
    model_dir = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p).input_ids for p in SAFE_PROMPTS[:2]]
    out = model_factory.hf_greedy(model_dir, prompts, 12)
    assert [len(o) for o in out] == [12, 12]
    assert all(0 <= t < len(tok) for o in out for t in o)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_steps_have_no_near_ties(tiny_model, kind):
    """The top-1/top-2 gap over 32 greedy steps stays far above float32 noise
    (relative to max|logit|), so engine-vs-transformers token comparisons on
    SAFE_PROMPTS cannot flip on rounding."""
    model_dir = tiny_model(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    worst = float("inf")
    for prompt in SAFE_PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id,
                output_scores=True, return_dict_in_generate=True,
            )
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            worst = min(worst, ((top2[0] - top2[1]) / scores[0].abs().max()).item())
    assert worst > 2e-3


def test_demo_model_builds_once_and_loads_with_transformers(tmp_path, monkeypatch):
    from pagedbatch import demo

    monkeypatch.setenv("PAGEDBATCH_CACHE_DIR", str(tmp_path))
    model_dir = demo.demo_model_dir()
    assert Path(model_dir) == tmp_path / "demo-model-v1"
    first = (Path(model_dir) / "model.safetensors").read_bytes()
    assert demo.demo_model_dir() == model_dir
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model-v1"]  # no temp folder left

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = "Hello 你好 🙂 é\n\t"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert model.config.vocab_size == 320 and model.config.max_position_embeddings == 2048
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 320)

    # deterministic: a second cache folder gets the same weights
    monkeypatch.setenv("PAGEDBATCH_CACHE_DIR", str(tmp_path / "again"))
    assert (Path(demo.demo_model_dir()) / "model.safetensors").read_bytes() == first
    assert "random weights" in demo.DEMO_NOTICE and "--model" in demo.DEMO_NOTICE
