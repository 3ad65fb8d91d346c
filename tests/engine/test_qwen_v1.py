"""Qwen (v1) checkpoints: a Qwen2 model renamed into Qwen v1 form must give the same tokens,
and the qwen.tiktoken tokenizer must round-trip text without running model-directory code."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_factory import SAFE_PROMPTS, build_model
from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.models.config import ModelArgs
from pagedbatch.engine.qwen_tiktoken import QwenTiktokenTokenizer, read_ranks
from pagedbatch.engine.tokenizer import encode_chat, load_tokenizer

# Merges for the tiny vocabulary: enough that some words are one token.
_MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"in", b"ing", b"\n\n"]
_VOCAB = 512  # model rows: 256 bytes + merges + 208 special tokens fit below it


def write_tiny_tiktoken(path: Path) -> dict[bytes, int]:
    """A qwen.tiktoken file: the 256 bytes (ranks 0-255), then the merges."""
    ranks = {bytes([b]): b for b in range(256)}
    for m in _MERGES:
        ranks[m] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def qwen2_to_qwen_v1(src: str, dst: Path) -> None:
    """Rewrite a Qwen2 checkpoint (multi-head, untied) with Qwen v1 names and config keys."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"], "Qwen v1 is multi-head attention"
    w = load_file(str(Path(src) / "model.safetensors"))
    out = {"transformer.wte.weight": w["model.embed_tokens.weight"], "transformer.ln_f.weight": w["model.norm.weight"],
           "lm_head.weight": w["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        s, d = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[d + f"attn.c_attn.{kind}"] = torch.cat([w[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]).contiguous()
        out[d + "attn.c_proj.weight"] = w[s + "self_attn.o_proj.weight"]
        out[d + "mlp.w1.weight"] = w[s + "mlp.up_proj.weight"]  # Qwen v1: w1 is up, w2 is the gate
        out[d + "mlp.w2.weight"] = w[s + "mlp.gate_proj.weight"]
        out[d + "mlp.c_proj.weight"] = w[s + "mlp.down_proj.weight"]
        out[d + "ln_1.weight"] = w[s + "input_layernorm.weight"]
        out[d + "ln_2.weight"] = w[s + "post_attention_layernorm.weight"]
        out[d + "attn.rotary_emb.inv_freq"] = torch.zeros(4)  # a buffer some checkpoints carry: ignored
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    rope = cfg.get("rope_parameters") or {}
    v1 = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},  # never imported by us
        "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"], "intermediate_size": 2 * cfg["intermediate_size"],
        "kv_channels": cfg["hidden_size"] // cfg["num_attention_heads"],
        "layer_norm_epsilon": cfg["rms_norm_eps"], "rotary_emb_base": rope.get("rope_theta", cfg.get("rope_theta")),
        "rotary_pct": 1.0, "seq_length": cfg["max_position_embeddings"], "max_position_embeddings": 8192,
        "vocab_size": cfg["vocab_size"], "no_bias": True, "tie_word_embeddings": False,
        "use_dynamic_ntk": True, "use_logn_attn": True, "bf16": False, "fp16": False, "fp32": True,
    }
    (dst / "config.json").write_text(json.dumps(v1, indent=2))
    # What would run with trust_remote_code: it must not be imported.
    (dst / "modeling_qwen.py").write_text("raise RuntimeError('model-directory code was run')\n")
    (dst / "tokenization_qwen.py").write_text("raise RuntimeError('model-directory code was run')\n")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_model("qwen2", tmp_path_factory.mktemp("qwen2-mha"), num_key_value_heads=4,
                       tie_word_embeddings=False, vocab_size=_VOCAB)


@pytest.fixture(scope="module")
def v1_dir(qwen2_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("qwen-v1")
    qwen2_to_qwen_v1(qwen2_dir, dst)
    ranks = write_tiny_tiktoken(dst / "qwen.tiktoken")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": len(ranks)}))
    return str(dst)


def test_qwen_v1_config_translates_to_the_qwen2_shape(qwen2_dir, v1_dir):
    v1, ref = ModelArgs.from_dir(v1_dir), ModelArgs.from_dir(qwen2_dir)
    assert v1.architecture == "QWenLMHeadModel"
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "rms_norm_eps", "rope_theta", "vocab_size", "attention_bias", "max_position_embeddings"):
        assert getattr(v1, field) == getattr(ref, field), field


def test_qwen_v1_checkpoint_gives_the_same_greedy_tokens_as_qwen2(qwen2_dir, v1_dir):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(qwen2_dir)
    prompts = [hf_tok(p)["input_ids"] for p in SAFE_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = InferenceEngine(qwen2_dir, device="cpu", dtype="float32", num_kv_blocks=64).generate(prompts, params)
    got = InferenceEngine(v1_dir, device="cpu", dtype="float32", num_kv_blocks=64).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_swapping_w1_and_w2_changes_the_tokens(qwen2_dir, v1_dir, tmp_path):
    # The mapping is pinned, not just accepted: with gate and up exchanged the output differs.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for f in Path(v1_dir).iterdir():
        if f.name != "model.safetensors":
            (swapped / f.name).write_bytes(f.read_bytes())
    w = load_file(str(Path(v1_dir) / "model.safetensors"))
    for k in [k for k in w if k.endswith("mlp.w1.weight")]:
        k2 = k.replace("w1", "w2")
        w[k], w[k2] = w[k2], w[k]
    save_file(w, str(swapped / "model.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    a = InferenceEngine(v1_dir, device="cpu", dtype="float32", num_kv_blocks=16).generate([[5, 6, 7, 8]], params)
    b = InferenceEngine(str(swapped), device="cpu", dtype="float32", num_kv_blocks=16).generate([[5, 6, 7, 8]], params)
    assert a[0].token_ids != b[0].token_ids


def test_qwen_v1_engine_generates_text_with_its_tiktoken_tokenizer(v1_dir):
    engine = InferenceEngine(v1_dir, device="cpu", dtype="float32", num_kv_blocks=32)
    assert isinstance(engine.tokenizer, QwenTiktokenTokenizer)
    tok = engine.tokenizer
    # <|endoftext|> (generation_config) and <|im_end|> (end of a chat turn) both end a request.
    assert {tok.eos_token_id, tok.im_end_id} <= engine.engine.eos_ids
    out = engine.generate(["hello world"], temperature=0, max_tokens=12, ignore_eos=True)[0]
    assert out.prompt_token_ids == tok.encode("hello world")
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    streamed = "".join(t for _, t in engine.stream_generate("hello world", temperature=0, max_tokens=12,
                                                              ignore_eos=True))
    assert streamed == out.text


def test_tiktoken_file_round_trips_text_and_uses_its_merges(tmp_path):
    ranks = write_tiny_tiktoken(tmp_path / "qwen.tiktoken")
    assert read_ranks(str(tmp_path / "qwen.tiktoken")) == ranks
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, QwenTiktokenTokenizer)
    for text in ["hello world", "Hello, World!\n\n  spaced\ttabs", "今天天气很好", "emoji 🙂🚀 café", "x" * 300]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.encode("hello") == [ranks[b"hello"]]
    assert tok.encode(" world") == [ranks[b" world"]]
    # Special tokens are numbered after the last rank, in Qwen's order.
    start = len(ranks)
    assert (tok.eos_token_id, tok.im_start_id, tok.im_end_id) == (start, start + 1, start + 2)
    assert tok.special_tokens["<|extra_0|>"] == start + 3
    assert tok.special_tokens["<|extra_204|>"] == start + 207 == len(tok) - 1


def test_special_token_text_encodes_to_its_id_and_is_skipped_on_request(tmp_path):
    write_tiny_tiktoken(tmp_path / "qwen.tiktoken")
    tok = load_tokenizer(str(tmp_path))
    ids = tok.encode("hi<|endoftext|>")
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "hi<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    # Half of a two-byte character decodes to U+FFFD, which the incremental detokenizer waits on.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_chat_template_is_chatml_with_a_default_system_turn(tmp_path):
    write_tiny_tiktoken(tmp_path / "qwen.tiktoken")
    tok = load_tokenizer(str(tmp_path))
    ids = encode_chat(tok, [{"role": "user", "content": "hello <|im_end|>"}])
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhello <|im_end|><|im_end|>\n<|im_start|>assistant\n")
    # Message text never becomes a special token: only the template's own markers are.
    assert ids.count(tok.im_end_id) == 2


def test_a_corrupt_tiktoken_file_names_its_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("aGk= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tokenizer(str(tmp_path))
