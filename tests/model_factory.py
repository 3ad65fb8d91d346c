"""Tiny random Hugging Face models and a tokenizer, built offline, for tests.

The models are small enough to build and run in milliseconds on a CPU, and
their weights are drawn with a large standard deviation so that greedy
decoding never sits on a near-tie: a 1e-5 numerical difference between our
engine and transformers must not be able to flip an argmax.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# A small mixed corpus: English prose, Chinese, code and some symbols, so the
# BPE learns multi-byte merges and the test tokenizer splits CJK text into
# several tokens per character now and then.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl named Lily who loved to play outside.",
    "She saw a big red ball in the park and wanted to play with it.",
    "Batch inference runs many prompts through a language model at once.",
    "Paged attention stores the key value cache in fixed size blocks.",
    "Hello, world! How are you today? I am fine, thank you.",
    "The scheduler hands out a token budget at every step of the engine.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159",
    "今天天气很好，我们去公园散步吧。",
    "我喜欢学习机器学习和自然语言处理。",
    "大型语言模型可以生成文本、翻译语言和回答问题。",
    "你好，世界！这是一个测试句子。",
    "北京是中国的首都，上海是一个大城市。",
    "def greedy(logits):\n    return logits.argmax(dim=-1)\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Sequence:\n    def __init__(self, token_ids):\n        self.token_ids = list(token_ids)\n",
    "import torch\nx = torch.zeros(4, 8)\ny = x @ x.T\n",
    "if (a && b) { return a + b; } else { return 0; }",
    "Emoji: 🙂 🚀 ✨ and accents: café naïve résumé",
]
_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]
# The models round their vocabulary up to a multiple of 64 (384), so some
# model rows have no token, as in real checkpoints.
_TOKENIZER_VOCAB_SIZE = 360
# Qwen2's split regex. transformers 5 rebuilds a "qwen2" directory's tokenizer
# with exactly this pipeline whatever tokenizer.json says, so every kind uses
# it and all of them reload identically.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

KINDS = ("llama", "llama3", "qwen2", "qwen3", "mistral")

# Prompts whose 32 greedy steps keep the top-1/top-2 logit gap above 2e-3 of
# max|logit| for every kind at seed 0 (pinned by test_model_factory). Random
# models tie within 1e-3 on roughly 1% of steps, so a test that compares our
# tokens with transformers' exactly should use these prompts.
SAFE_PROMPTS = (
    "def = time cat café 42 1 = once",
    "x ( 世界 token upon",
    "( ( dog batch model 你好 学习",
    "dog hello 42",
    "Batch inference runs many prompts",
    "import torch",
)

_tokenizer_json_cache: str | None = None


def _train_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return its JSON."""
    global _tokenizer_json_cache
    if _tokenizer_json_cache is None:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_TOKENIZER_VOCAB_SIZE,
            special_tokens=_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
        _tokenizer_json_cache = tok.to_str()
    return _tokenizer_json_cache


def build_tokenizer(out_dir: str | os.PathLike):
    """Write the test tokenizer (byte-level BPE, 360 tokens) into ``out_dir``.

    Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``. Deterministic.
    Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _make_config(kind: str, tokenizer, overrides: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        cls = LlamaConfig
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    elif kind == "llama3":
        cls = LlamaConfig
        # head_dim 16, theta 10000: wavelengths 6.3, 20, 63, 199, ... With an
        # original context of 64 the first is kept, the next two are smoothed
        # and the rest divided by 8, so every branch of llama3 scaling is hit.
        common["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    elif kind == "qwen2":
        cls = Qwen2Config
        common.update(tie_word_embeddings=True, use_sliding_window=False)
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    elif kind == "qwen3":
        cls = Qwen3Config
        common.update(head_dim=32, tie_word_embeddings=True, use_sliding_window=False)
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    elif kind == "mistral":
        cls = MistralConfig
        common.update(sliding_window=None)
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    common.update(overrides)
    return cls(**common)


def _init_weights(model: torch.nn.Module, seed: int, num_real_tokens: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                # RMSNorm gains: around 1 but far enough from it to matter.
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            else:
                # std 0.4 (not 0.02): logits spread over several units, so
                # greedy picks are decided by a wide margin.
                param.copy_(0.4 * torch.randn(param.shape, generator=gen))
        # Rows past the tokenizer's vocabulary (padding, as in real checkpoints)
        # get small weights so greedy decoding never picks a token that the
        # tokenizer cannot decode.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight[num_real_tokens:] *= 0.05


def build_model(
    kind: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    shard: bool = False,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> str:
    """Build a tiny random ``kind`` model plus the test tokenizer in ``out_dir``.

    ``kind`` is one of ``KINDS``. ``shard=True`` splits the safetensors
    weights into several files with an index. Extra keyword arguments override
    config fields. Returns ``out_dir`` as a string.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = str(out_dir)
    tokenizer = build_tokenizer(out_dir)
    config = _make_config(kind, tokenizer, config_overrides)
    torch.manual_seed(seed)  # transformers' own init, overwritten below anyway
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed, len(tokenizer))
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, max_shard_size="40KB" if shard else "1GB")
    return out_dir


def hf_greedy(model_dir: str | os.PathLike, prompts_token_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference greedy generation with transformers: exactly ``max_new_tokens``
    new tokens per prompt (EOS does not stop it), one prompt at a time."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    # transformers fills unset fields from the model's own generation config,
    # EOS included: clear it there so EOS never ends the reference early.
    model.generation_config.eos_token_id = None
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        bos_token_id=model.config.bos_token_id,
    )
    outputs = []
    with torch.no_grad():
        for ids in prompts_token_ids:
            input_ids = torch.tensor([ids], dtype=torch.long)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=gen_config,
            )
            new = out[0, len(ids):].tolist()
            if len(new) != max_new_tokens:
                raise RuntimeError(f"transformers generated {len(new)} tokens, expected {max_new_tokens}")
            outputs.append(new)
    return outputs


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())



def build_shaped_model(
    config_name: str,
    out_dir: str | os.PathLike,
    *,
    num_layers: int,
    vocab_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """A random model with the shape of ``configs/models/<config_name>`` (fewer layers, a smaller vocabulary).

    The weights imitate a trained model's statistics where quantization
    cares: rows of different magnitudes (log-normal row norms, so per-channel
    scales differ), a few hidden dimensions with large norm gains (activation
    outliers, so they set the per-token scales), std-0.02 linear weights and
    std-0.1 embeddings (logits spread over several units, as trained models'
    are). Written straight to safetensors in ``dtype`` (bf16: the values a
    bf16 checkpoint holds) under Hugging Face's names, without transformers;
    no tokenizer (prompts are token ids). Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    from pagedbatch.engine.models.config import ModelArgs

    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((root / "configs" / "models" / config_name).read_text())
    cfg.update(num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=1024,
               bos_token_id=0, eos_token_id=1, torch_dtype=str(dtype).replace("torch.", ""))
    a = ModelArgs.from_hf_dict(cfg)
    gen = torch.Generator().manual_seed(seed)

    def linear(n: int, k: int) -> torch.Tensor:
        rows = torch.exp(0.5 * torch.randn(n, 1, generator=gen))
        return 0.02 * rows * torch.randn(n, k, generator=gen)

    def gain(n: int, outliers: int = 0) -> torch.Tensor:
        g = 1.0 + 0.1 * torch.randn(n, generator=gen)
        g[:outliers] *= 8.0  # outlier dimensions
        return g

    h, q, kv = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    t = {"model.embed_tokens.weight": 0.1 * torch.randn(vocab_size, h, generator=gen)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = gain(h, 4)
        for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            t[p + f"self_attn.{name}.weight"] = linear(n, h)
            if a.attention_bias:
                t[p + f"self_attn.{name}.bias"] = 0.1 * torch.randn(n, generator=gen)
        if a.qk_norm:
            t[p + "self_attn.q_norm.weight"] = gain(a.head_dim)
            t[p + "self_attn.k_norm.weight"] = gain(a.head_dim)
        t[p + "self_attn.o_proj.weight"] = linear(h, q)
        if a.o_proj_bias:
            t[p + "self_attn.o_proj.bias"] = 0.1 * torch.randn(h, generator=gen)
        t[p + "post_attention_layernorm.weight"] = gain(h, 4)
        t[p + "mlp.gate_proj.weight"] = linear(a.intermediate_size, h)
        t[p + "mlp.up_proj.weight"] = linear(a.intermediate_size, h)
        t[p + "mlp.down_proj.weight"] = linear(h, a.intermediate_size)
        if a.mlp_bias:
            for name, n in (("gate_proj", a.intermediate_size), ("up_proj", a.intermediate_size), ("down_proj", h)):
                t[p + f"mlp.{name}.bias"] = 0.1 * torch.randn(n, generator=gen)
    t["model.norm.weight"] = gain(h)
    if not a.tie_word_embeddings:
        t["lm_head.weight"] = 0.1 * torch.randn(vocab_size, h, generator=gen)
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
