"""Linear-layer biases exactly where transformers builds them (CPU, float32, greedy ids equal HF's).

Llama and Qwen3 read ``attention_bias`` (q/k/v *and* o_proj), Llama reads
``mlp_bias`` (gate/up/down), Qwen2 always has q/k/v bias whatever its
config.json says. Dropping any of these biases changes the tokens; under
tensor parallelism a row-parallel bias (o_proj, down_proj) added on every
rank before the all-reduce would count twice.
"""
import pytest

from model_factory import build_model, hf_greedy
from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.models.config import ModelArgs

MAX_NEW = 16
TEXTS = ["Hello", "The quick brown fox jumps over", "人工智能的未来是什么样的",
         "def add(a, b):\n    return"]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
CASES = {
    "llama-attention-bias": ("llama", dict(attention_bias=True)),
    "llama-mlp-bias": ("llama", dict(mlp_bias=True)),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),
    # Qwen2Config has no attention_bias: transformers keeps the q/k/v biases and ignores the key.
    "qwen2-attention-bias-false": ("qwen2", dict(attention_bias=False)),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Per case: (model dir, prompts, HF greedy outputs), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            kind, overrides = CASES[name]
            d = build_model(kind, tmp_path_factory.mktemp(name), **overrides)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(d)
            prompts = [tok(t)["input_ids"] for t in TEXTS]
            cache[name] = (d, prompts, hf_greedy(d, prompts, MAX_NEW))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_biased_models_generate_hf_greedy_tokens(case, name):
    d, prompts, ref = case(name)
    engine = InferenceEngine(d, dtype="float32", device="cpu")
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref


def test_tp2_adds_row_parallel_biases_once_and_matches_hf(tmp_path):
    d = build_model("llama", tmp_path, attention_bias=True, mlp_bias=True, intermediate_size=129)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    ref = hf_greedy(d, prompts, MAX_NEW)
    with InferenceEngine(d, dtype="float32", device="cpu", tensor_parallel_size=2) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref


def test_bias_flags_follow_what_transformers_builds_per_architecture():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)

    def args(arch, **keys):
        return ModelArgs.from_hf_dict({"architectures": [arch], **base, **keys})

    llama = args("LlamaForCausalLM", attention_bias=True, mlp_bias=True)
    assert (llama.attention_bias, llama.o_proj_bias, llama.mlp_bias) == (True, True, True)
    qwen3 = args("Qwen3ForCausalLM", attention_bias=True, mlp_bias=True)
    assert (qwen3.attention_bias, qwen3.o_proj_bias, qwen3.mlp_bias) == (True, True, False)
    qwen2 = args("Qwen2ForCausalLM", attention_bias=False, mlp_bias=True)
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.mlp_bias) == (True, False, False)
    mistral = args("MistralForCausalLM", attention_bias=True, mlp_bias=True)
    assert (mistral.attention_bias, mistral.o_proj_bias, mistral.mlp_bias) == (False, False, False)
