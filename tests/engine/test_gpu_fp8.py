"""fp8 weights on the GPU (``pytest -m gpu``; needs compute capability >= 8.9).

- The fused per-token activation quantization: bit-identical to the torch
  rule (``quantize_rows``) at the 7B layers' input widths, rows read from a
  NaN-padded buffer and outputs pre-filled with NaN.
- ``torch._scaled_mm`` (and whatever ``linear()`` routes to: the skinny GEMM
  for few rows) at the 7B shapes and M in {1, 7, 64, 512, 4096}, against a
  float32 product of the same quantized operands: one bf16 rounding of the
  output plus float32 reassociation. Inputs sit in NaN-padded rows; large
  outputs land in memory the caching allocator just held NaN in.
- The engine with CUDA graphs on a Qwen2.5-0.5B-shaped model (bf16 values):
  next-token distributions against Hugging Face bf16 (sdpa), teacher-forced,
  within the CPU tests' bounds; against the CPU reference path of the same fp8
  numerics; graph replays equal eager steps. A 7B fp8 model loads within its
  fp8 size plus one tensor in float32.
"""
import gc
import os
import shutil

import pytest
import torch

from logit_agreement import forced_logits, greedy_tokens, kl_and_top1
from model_factory import build_shaped_model
from pagedbatch import InferenceEngine
from pagedbatch.engine.models.fp8 import FP8, dequantize_rows, quantize_per_token, quantize_rows
from pagedbatch.engine.models.linear import fp8_linear_scaled_mm, linear, route
from pagedbatch.engine.models.mid_gemm import default_config
from pagedbatch.engine.models.skinny_gemm import skinny_max_m

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_7B = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
MS = [1, 7, 64, 512, 4096]
SHAPED_BOUND = (0.1, 0.85)  # test_fp8_accuracy.py's, measured on the CPU for this model


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN in a freed block of ``nbytes``: the next allocations of that size reuse it."""
    t = torch.full((nbytes // 2 + 1024,), float("nan"), dtype=torch.bfloat16, device="cuda")
    del t


def _activations(M: int, K: int, g: torch.Generator) -> torch.Tensor:
    """bf16 [M, K] with outlier columns, inside a NaN-filled [M, K + 64] buffer."""
    buf = torch.full((M, K + 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    x = buf[:, :K]
    vals = torch.randn(M, K, device="cuda", generator=g)
    vals[:, ::97] *= 30.0
    x.copy_(vals)
    return x


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", [3584, 18944])  # every 7B linear's input width: hidden, and down_proj's
def test_fused_activation_quantization_is_bit_identical_to_the_torch_rule(K, M):
    g = torch.Generator(device="cuda").manual_seed(M + K)
    x = _activations(M, K, g)
    x[0] = 0.0  # an all-zero row (CUDA-graph padding rows can be)
    out = torch.full((M, K), float("nan"), device="cuda").to(FP8)
    scale_out = torch.full((M, 1), float("nan"), device="cuda")
    q, s = quantize_per_token(x, out, scale_out)
    ref_q, ref_s = quantize_rows(x)
    assert torch.equal(s[:, 0], ref_s)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def _check_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(y).all(), "an output element was not written"
    err = (y.float() - ref).abs()
    bound = ref.abs() / 128 + 1e-3 * ref.abs().max()  # one bf16 rounding + float32 reassociation
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", list(SHAPES_7B))
def test_scaled_mm_and_routed_linear_match_float32_of_the_same_quantized_operands(shape, M):
    N, K = SHAPES_7B[shape]
    g = torch.Generator(device="cuda").manual_seed(N + M)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    wq, ws = quantize_rows(w)
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16) if shape == "qkv" else None
    x = _activations(M, K, g)
    xq, xs = quantize_rows(x)
    ref = dequantize_rows(xq, xs) @ dequantize_rows(wq, ws).t()
    if bias is not None:
        ref += bias.float()
    room = M * N * 2 + M * K + 2**22  # the quantized activation is allocated first, then the output
    _poison_allocator(room)
    _check_close(fp8_linear_scaled_mm(x, wq, ws, bias), ref)
    routed = route(M, N, K, FP8, x.device, True)
    assert routed == ("skinny" if M <= skinny_max_m(FP8) else "mid" if default_config(M, N, K) else "scaled_mm")
    if routed == "skinny":
        # The skinny kernel multiplies the bf16 activations themselves (weights-only fp8): its
        # reference has no activation quantization.
        ref = x.float() @ dequantize_rows(wq, ws).t()
        if bias is not None:
            ref += bias.float()
    _poison_allocator(room)
    _check_close(linear(x, wq, bias, ws), ref)


def test_routed_linear_replays_in_a_cuda_graph():
    N, K = SHAPES_7B["qkv"]
    g = torch.Generator(device="cuda").manual_seed(0)
    wq, ws = quantize_rows(torch.randn(N, K, device="cuda", generator=g) * 0.02)
    for M in (7, 512):
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        linear(x, wq, None, ws)  # warm-up: compile, allocate
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = linear(x, wq, None, ws)
        x.copy_(torch.randn(M, K, device="cuda", generator=g))
        graph.replay()
        assert torch.equal(y, linear(x, wq, None, ws))


def test_a_7b_model_loads_in_fp8_within_its_size_plus_little(tmp_path):
    from pagedbatch.engine.models.config import ModelArgs
    from pagedbatch.engine.models.loader import load_model

    d = tmp_path / "qwen2.5-7b"
    d.mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "models", "qwen2.5-7b.json"), d / "config.json")
    args = ModelArgs.from_dir(str(d))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(str(d), args, torch.bfloat16, torch.device("cuda"), load_format="dummy", quantization="fp8")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    bf16_size = sum(p.numel() * 2 for p in model.parameters() if p.dtype != torch.float32)
    peak = torch.cuda.max_memory_allocated() - base
    assert size < 0.6 * bf16_size, (size, bf16_size)
    # One tensor at a time in float32 beside the model (gate_up, the largest: 0.54 GB).
    assert peak <= size + 1.5 * 2**30, f"peak {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB model"


def _hf_forced_logits(model_dir: str, prompts, tokens) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    hf = hf.to("cuda").eval()
    steps = tokens.shape[1]
    out = []
    with torch.no_grad():
        for p, t in zip(prompts, tokens.tolist()):
            ids = torch.tensor([p + t[:-1]], device="cuda")
            out.append(hf(ids).logits[0, len(p) - 1: len(p) - 1 + steps].float().cpu())
    del hf
    return torch.stack(out)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(16)]


@pytest.mark.parametrize("layers, vocab", [(2, 4096), (24, 151936)], ids=["2-layers", "24-layers"])
def test_fp8_engine_with_cuda_graphs_stays_close_to_hf_bf16(tmp_path, layers, vocab):
    d = build_shaped_model("qwen2.5-0.5b.json", tmp_path / "m", num_layers=layers, vocab_size=vocab)
    prompts = _prompts(vocab)
    kw = dict(device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=16, num_kv_blocks=256)
    bf16 = InferenceEngine(d, **kw)
    tokens = greedy_tokens(bf16, prompts, 32)
    hf = _hf_forced_logits(d, prompts, tokens)
    ours_bf16 = forced_logits(bf16, prompts, tokens, decode=True)
    del bf16
    fp8 = InferenceEngine(d, quantization="fp8", **kw)
    assert fp8.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    ours_fp8 = forced_logits(fp8, prompts, tokens, decode=True)
    control, got = kl_and_top1(hf, ours_bf16), kl_and_top1(hf, ours_fp8)
    print(f"\n{layers} layers: ours bf16 vs HF bf16 (KL, top-1) {control}; ours fp8 vs HF bf16 {got}")
    # Measured on the H200 (2026-12-03), 24 layers: (0.0058, 0.906): bf16 rounding flips near-ties of a
    # random model's logits, so top-1 against HF's own bf16 run is far from 1 even for the bf16 engine.
    assert control[0] <= 0.01 and control[1] >= 0.85, control
    # 24 layers, full vocabulary: measured on the H200 (2026-12-03) at (0.32, 0.50). A random model's
    # logits are nearly tied across 152k tokens, and fp8's few percent per matmul compound over 24 layers;
    # the tight checks are the 2-layer bound and the GPU-vs-CPU-reference agreement below.
    bound = SHAPED_BOUND if layers == 2 else (0.45, 0.40)
    assert got[0] <= bound[0] and got[1] >= bound[1], (got, bound)
    # Graph replays and eager steps run the same kernels.
    eager = InferenceEngine(d, quantization="fp8", enforce_eager=True, **kw)
    # Not bit-identical: a graph bucket is captured for the longest context (more decode-attention splits)
    # and pads the batch, so sums are ordered differently (seen 2026-12-03: max |diff| 0.125 of 17.6).
    same = kl_and_top1(forced_logits(eager, prompts, tokens, decode=True), ours_fp8)
    assert same[0] <= 2e-3 and same[1] >= 0.95, same
    del eager, fp8
    if layers == 2:
        # The GPU kernels implement the CPU reference path's numerics: they differ by the bf16 rounding of
        # the activations only, but an activation rounded to bf16 first can land on the neighbouring e4m3
        # value (a 6% step) when it is quantized, so the gap is larger than bf16's alone (KL ~4e-4 on the
        # CPU). Measured on the H200 (2026-12-03): (0.019, 0.9375), against a guessed (0.02, 0.95) that
        # failed; a broken scale crosses (0.1, 0.85) (test_fp8_accuracy's broken-scale cases).
        cpu = InferenceEngine(d, device="cpu", dtype="float32", quantization="fp8", skip_tokenizer_init=True,
                              num_kv_blocks=128)
        ref = forced_logits(cpu, prompts, tokens, decode=False)
        cross = kl_and_top1(ref, ours_fp8)
        print(f"GPU fp8 vs CPU fp8 reference {cross}")
        assert cross[0] <= 0.03 and cross[1] >= 0.9, cross


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
def test_a_warmed_up_engine_compiles_no_gemm_variant_as_its_batch_shrinks(tmp_path, quantization):
    """Decode runs in CUDA graphs captured for every bucket, but the LM head runs outside them at each step's
    row count: the runner warms its skinny-GEMM variants up at start. Before that, an H200 W-nano run with
    fp8 weights (whose forward shares no variant with the bf16 head) compiled 3 mid-job, 0.8 s of 6.5 s."""
    from pagedbatch import SamplingParams
    from pagedbatch.engine.models import skinny_gemm
    from pagedbatch.engine.triton_variants import compiled_variants

    d = build_shaped_model("qwen2.5-0.5b.json", tmp_path / "m", num_layers=2, vocab_size=4096)
    eng = InferenceEngine(d, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=32,
                          num_kv_blocks=256, quantization=quantization)
    before = compiled_variants(skinny_gemm._skinny_kernel)
    # 20 requests finishing one step apart: the batch passes through every row count from 20 down to 1.
    prompts = [[5 + i, 7, 9 + i] for i in range(20)]
    eng.generate(prompts, [SamplingParams(max_tokens=2 + i, ignore_eos=True) for i in range(20)])
    assert compiled_variants(skinny_gemm._skinny_kernel) == before


def test_fp8_engine_with_quantization_fused_into_the_norms_gives_the_same_logits(tmp_path, monkeypatch):
    """linear.FUSE_FP8_QUANT: at 32 rows (the _scaled_mm route) the norms and SiLU·mul quantize the
    activations of qkv, gate_up and down themselves; the bits are those of the separate quantize kernel,
    so teacher-forced logits through CUDA graphs are identical."""
    from pagedbatch.engine.models import linear as linear_mod

    d = build_shaped_model("qwen2.5-0.5b.json", tmp_path / "m", num_layers=2, vocab_size=4096)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 4096, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g).tolist()
               for _ in range(32)]
    kw = dict(device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=32, num_kv_blocks=512,
              quantization="fp8")
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT", False)
    eng = InferenceEngine(d, **kw)
    tokens = greedy_tokens(eng, prompts, 16)
    want = forced_logits(eng, prompts, tokens, decode=True)
    del eng
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT", True)
    monkeypatch.setattr(linear_mod, "FUSE_FP8_QUANT_MIN_ROWS", 17)  # fused at these 17-32-row decode steps too
    fused = InferenceEngine(d, **kw)
    assert fused.engine.runner.graphs is not None
    assert torch.equal(greedy_tokens(fused, prompts, 16), tokens)
    assert torch.equal(forced_logits(fused, prompts, tokens, decode=True), want)


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
def test_biased_llama_through_cuda_graphs_and_the_skinny_gemm_stays_close_to_hf_bf16(tmp_path, quantization):
    """o_proj and down_proj biases (Llama attention_bias / mlp_bias) on the GPU fast path: decode steps replay
    CUDA graphs whose linears route to the skinny GEMM, which takes the bias (gate_up's SiLU·mul fused)."""
    from transformers import AutoModelForCausalLM

    from model_factory import build_model

    d = build_model("llama", tmp_path / "m", attention_bias=True, mlp_bias=True, hidden_size=256,
                    intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            # Biases large enough that dropping one (or adding it twice) moves the logits far past the bound.
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.3 if name.endswith("bias") else 0.05)
    m.to(torch.bfloat16).save_pretrained(d)
    M = 16
    fp8 = quantization == "fp8"
    assert route(M, 256, 512, FP8 if fp8 else torch.bfloat16, torch.device("cuda"), fp8) == "skinny"
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 300, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist()
               for _ in range(M)]
    kw = dict(device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=M, num_kv_blocks=256)
    eng = InferenceEngine(d, quantization=quantization, **kw)
    assert eng.engine.runner.graphs is not None
    tokens = greedy_tokens(eng, prompts, 24)
    hf = _hf_forced_logits(d, prompts, tokens)
    got = kl_and_top1(hf, forced_logits(eng, prompts, tokens, decode=True))
    del eng
    with torch.no_grad():  # the control: the same model with its row-parallel biases dropped
        for layer in m.model.layers:
            layer.self_attn.o_proj.bias.zero_()
            layer.mlp.down_proj.bias.zero_()
    m.to(torch.bfloat16).save_pretrained(tmp_path / "dropped")
    dropped = kl_and_top1(hf, _hf_forced_logits(str(tmp_path / "dropped"), prompts, tokens))
    print(f"\n{quantization or 'bf16'} vs HF bf16 {got}; HF without o/down biases {dropped}")
    # Measured on an H100 (2026-12-05): bf16 (1.4e-5, 0.974), fp8 (6.8e-4, 0.776), the control (0.32-0.33, 0.02-0.03).
    # fp8's top-1 is low though its KL is small: this random model's logits are near-tied over its 384 tokens.
    bound = (0.01, 0.85) if quantization is None else (0.01, 0.7)
    assert got[0] <= bound[0] and got[1] >= bound[1], (got, bound)
    assert dropped[0] > 10 * bound[0] and dropped[1] < 0.5, dropped
