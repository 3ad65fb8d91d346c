"""fp8 weights keep the next-token distributions close to the unquantized model's, and a broken scale does not.

Measured as mean KL(reference || fp8) and top-1 agreement over 16 prompts x
32 steps, teacher-forced on the reference's greedy tokens
(``logit_agreement.py``). On the CPU the fp8 engine runs the reference path
(the GPU's quantization numerics, float32 matmuls). References: the same
weights unquantized, computed in float32 and in bfloat16.

Bounds (measured values in brackets, 2026-12-03):
- Qwen2.5-0.5B-shaped (real widths, 2 layers, 4,096-token vocabulary,
  trained-like statistics: ``model_factory.build_shaped_model``, bf16
  values): KL <= 0.1 and top-1 >= 0.85 against both references [KL 0.039,
  top-1 0.92-0.93]; bf16 against float32, for scale: KL 0.0004, top-1 0.996.
- Tiny test models (std-0.4 weights, chosen to make greedy decoding decisive,
  which makes every rounding error large): KL <= 0.6, top-1 >= 0.5 [KL
  0.08-0.43, top-1 0.60-0.81; bf16: KL 0.001-0.01].
A scale that is off (one layer's x4) or misassigned (k/v slices swapped,
channels reversed) crosses them [KL 0.38-3.6 on the 0.5B shape, 0.9-2.7 on
the tiny models]: each such breakage is a test below.
"""
import contextlib

import pytest
import torch

from logit_agreement import forced_logits, greedy_tokens, kl_and_top1
from model_factory import build_shaped_model
from pagedbatch import InferenceEngine

STEPS = 32
SHAPED_BOUND = (0.1, 0.85)  # (max mean KL, min top-1 agreement)
TINY_BOUND = (0.6, 0.5)


def within(bound, kl_top1) -> bool:
    return kl_top1[0] <= bound[0] and kl_top1[1] >= bound[1]


def make_prompts(vocab: int, low: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(low, vocab, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g).tolist()
            for _ in range(16)]


class Case:
    """Engines on one model: float32 and bf16 references and fp8, with the forced tokens and their logits."""

    def __init__(self, model_dir: str, vocab: int, tokens_from: str):
        kw = {"device": "cpu", "num_kv_blocks": 16 * 4, "skip_tokenizer_init": True}
        self.prompts = make_prompts(vocab)
        self.f32 = InferenceEngine(model_dir, dtype="float32", **kw)
        self.bf16 = InferenceEngine(model_dir, dtype="bfloat16", **kw)
        self.fp8 = InferenceEngine(model_dir, dtype="float32", quantization="fp8", **kw)
        # One reference's greedy tokens (the one whose CPU matmuls are cheaper at that size); all three
        # engines are then forced on them, prompt and continuation in one prefill step each.
        self.tokens = greedy_tokens(getattr(self, tokens_from), self.prompts, STEPS)
        self.ref = {name: self.logits(getattr(self, name)) for name in ("f32", "bf16")}
        self._fp8 = None

    def logits(self, engine):
        return forced_logits(engine, self.prompts, self.tokens, decode=False)

    def fp8_against(self, ref: str, cached: bool = True):
        if not cached or self._fp8 is None:
            logits = self.logits(self.fp8)
            if not cached:
                return kl_and_top1(self.ref[ref], logits)
            self._fp8 = logits
        return kl_and_top1(self.ref[ref], self._fp8)

    @contextlib.contextmanager
    def broken(self, param: str, how):
        """The fp8 engine with scale parameter ``param`` changed by ``how`` (in place), restored afterwards."""
        scale = self.fp8.engine.runner.model.get_parameter(param)
        saved = scale.detach().clone()
        with torch.no_grad():
            how(scale, self.fp8.engine.runner.model.get_submodule(param.rsplit(".", 1)[0]))
        try:
            yield
        finally:
            with torch.no_grad():
                scale.copy_(saved)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    d = build_shaped_model("qwen2.5-0.5b.json", tmp_path_factory.mktemp("qwen05"), num_layers=2, vocab_size=4096)
    return Case(d, 4096, tokens_from="bf16")


def test_fp8_logits_stay_within_bounds_of_float32_and_bf16_on_a_qwen2_5_0_5b_shaped_model(shaped):
    bf16_vs_f32 = kl_and_top1(shaped.ref["f32"], shaped.ref["bf16"])
    assert bf16_vs_f32[0] <= 0.01 and bf16_vs_f32[1] >= 0.97, bf16_vs_f32  # the references agree
    for ref in ("f32", "bf16"):
        got = shaped.fp8_against(ref)
        assert within(SHAPED_BOUND, got), (ref, got)
        assert got[0] > 5 * bf16_vs_f32[0], "fp8 must differ from the references more than bf16 rounding does"


def _times4(scale, module):
    scale.mul_(4.0)


def _swap_k_v(scale, attn):
    q, kv = attn.q_size, attn.kv_size
    k = scale[q: q + kv].clone()
    scale[q: q + kv] = scale[q + kv:]
    scale[q + kv:] = k


def _reversed(scale, module):
    scale.copy_(scale.flip(0))


BROKEN = {
    "qkv-x4-layer1": ("layers.1.self_attn.qkv_proj_weight_scale", _times4),
    "k-v-slices-swapped-layer0": ("layers.0.self_attn.qkv_proj_weight_scale", _swap_k_v),
    "o-channels-reversed-layer1": ("layers.1.self_attn.o_proj_weight_scale", _reversed),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_a_broken_scale_crosses_the_bound(shaped, breakage):
    param, how = BROKEN[breakage]
    with shaped.broken(param, how):
        got = shaped.fp8_against("f32", cached=False)
    assert not within(SHAPED_BOUND, got), got


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fp8_logits_on_tiny_models_stay_within_bounds_and_a_broken_scale_crosses_them(tiny_model, kind):
    case = Case(tiny_model(kind), 360, tokens_from="f32")
    for ref in ("f32", "bf16"):
        got = case.fp8_against(ref)
        assert within(TINY_BOUND, got), (ref, got)
    with case.broken("layers.1.self_attn.qkv_proj_weight_scale", _times4):
        got = case.fp8_against("f32", cached=False)
    assert not within(TINY_BOUND, got), got
