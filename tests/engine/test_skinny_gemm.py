"""The skinny (small-M) GEMM kernel against float64/float32 references.

On the CPU the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU) in float32 at small shapes: every path
(fma with one row and with a row tile, tensor-core dot and its transposed
form, split-K with its last-arriver reduction, the silu_mul prologue, fp8
weights read from torch's cast, uneven K tails, partial column tiles). On the
GPU (``-m gpu``) the real decode shapes in bf16 and fp8, and CUDA-graph replay.
Outputs and split-K workspaces start as NaN, so an element never written or a
partial never stored shows up.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pagedbatch.engine.models import skinny_gemm as sg  # noqa: E402
from pagedbatch.engine.models.config import ModelArgs  # noqa: E402
from pagedbatch.engine.models.sharding import TPShard, local_args  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
C = sg.SkinnyConfig.parse


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """Split-K partial workspaces start as NaN: the reduction must read only partials that were stored."""
    monkeypatch.setattr(sg, "_new_workspace",
                        lambda split, M, N, device: torch.full((split, M, N), float("nan"), device=device))


def quantize(w: torch.Tensor):
    """Per-output-channel e4m3 weights (torch's cast, exact on the CPU too) and their float32 scales."""
    scale = (w.float().abs().amax(dim=1) / torch.finfo(FP8).max).clamp_min(1e-12)
    return (w.float() / scale[:, None]).clamp(-448, 448).to(FP8), scale


def make_weights(kind: str, N: int, K: int, dtype, g: torch.Generator):
    """(weight, scale, dequantized float64 weight) for kind fp32 (random), bf16 (bf16-valued) or fp8."""
    w = torch.randn(N, K, generator=g)
    if kind == "fp8":
        q, s = quantize(w)
        return q.to(DEV), s.to(DEV), q.double() * s.double()[:, None]
    if kind == "bf16":
        w = w.to(torch.bfloat16)
    w = w.to(dtype)
    return w.to(DEV), None, w.double()


def reference(x: torch.Tensor, w64: torch.Tensor, bias, act=None) -> torch.Tensor:
    x = x.double().cpu()
    if act == "silu_mul":
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = x @ w64.T
    return y if bias is None else y + bias.double().cpu()


def run(x, w, scale, bias, cfg, act=None):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = sg.skinny_linear(x, w, scale, bias, act=act, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


# (config, K): each covers one kernel path; the K values make uneven tails (112 = 3.5 x 32) and
# splits of unequal length (160 = 5 tiles -> 2 + 2 + 1).
PATHS = [
    ("fma bm1 bn16 bk32 sk1 w4 st2", 112),
    ("fma bm1 bn16 bk32 sk3 w4 st2", 160),
    ("fma bm4 bn16 bk32 sk2 w4 st2", 112),
    ("dot bm16 bn32 bk32 sk3 w4 st2", 160),
    ("dotT bm16 bn32 bk32 sk1 w4 st2", 112),
]


@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("cfg,K", PATHS, ids=[p[0].replace(" ", "-") for p in PATHS])
def test_kernel_matches_float64_reference(cfg, K, M, weights, poisoned_workspace):
    if M == 16 and "bm1 " in cfg:
        pytest.skip("16 one-row M tiles are 3 one-row tiles again (M=3), at ~25 ms per program in the interpreter")
    g = torch.Generator().manual_seed(M * 1000 + K)
    N = 40  # not a multiple of 16 or 32: the last column tile is partial
    w, scale, w64 = make_weights(weights, N, K, torch.float32, g)
    x = torch.randn(M, K, generator=g)
    if weights == "bf16":
        x = x.to(torch.bfloat16).float()  # bf16 values, float32 arithmetic (the interpreter's bf16 is wrong)
    bias = torch.randn(N, generator=g).to(DEV) if M != 3 else None
    y = run(x.to(DEV), w, scale, bias, C(cfg))
    want = reference(x, w64, bias)
    assert torch.isfinite(y).all(), "an output element was not written (or a NaN partial was read)"
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("weights", ["fp32", "fp8"])
@pytest.mark.parametrize("cfg", ["fma bm1 bn16 bk32 sk2 w4 st2", "dot bm16 bn32 bk32 sk1 w4 st2"])
def test_silu_mul_prologue_multiplies_by_silu_gate_times_up(cfg, weights, poisoned_workspace):
    g = torch.Generator().manual_seed(7)
    N, K, M = 40, 96, 3
    w, scale, w64 = make_weights(weights, N, K, torch.float32, g)
    gate_up = 2 * torch.randn(M, 2 * K, generator=g)
    y = run(gate_up.to(DEV), w, scale, None, C(cfg), act="silu_mul")
    want = reference(gate_up, w64, None, act="silu_mul")
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("weights", ["fp32", "fp8"])
def test_mlp_down_projection_fuses_the_activation_for_one_row_only(weights, monkeypatch):
    """silu_mul_linear (the MLP's down projection) on the skinny route: one row runs the silu_mul prologue,
    more rows the activation kernel then the plain GEMM; both equal silu_and_mul followed by linear."""
    from pagedbatch.engine.models import linear as linear_mod
    from pagedbatch.engine.models.fused_ops import silu_and_mul

    calls = []
    real = sg.skinny_linear
    monkeypatch.setattr(linear_mod, "route", lambda *a: "skinny")  # the CPU's route is "linear"/"reference"
    monkeypatch.setattr(sg, "skinny_linear", lambda *a, **kw: calls.append(kw.get("act")) or real(*a, **kw))
    g = torch.Generator().manual_seed(11)
    N, K = 40, 96
    w, scale, w64 = make_weights(weights, N, K, torch.float32, g)
    for M in (1, 3):
        gate_up = 2 * torch.randn(M, 2 * K, generator=g).to(DEV)
        calls.clear()
        y = linear_mod.silu_mul_linear(gate_up, w, scale)
        assert ("silu_mul" in calls) == (M == 1), (M, calls)
        want = reference(silu_and_mul(gate_up), w64, None)
        torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


NORM_PATHS = [("fma bm1 bn16 bk32 sk1 w4 st2", 112, "fp32"), ("fma bm1 bn16 bk32 sk3 w4 st2", 160, "fp8"),
              ("fma bm4 bn16 bk32 sk2 w4 st2", 112, "fp32"), ("dot bm16 bn32 bk32 sk3 w4 st2", 160, "bf16"),
              ("dotT bm16 bn32 bk32 sk1 w4 st2", 112, "fp8"), ("dotH bm16 bn32 bk32 sk2 w4 st2", 96, "fp8")]


def norm_reference(x, res, nw, eps, w64, bias):
    """float64: rms_norm(x + res) * nw, then the linear; and the new residual."""
    h = (x + res) if res is not None else x
    h64 = h.double()
    normed = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    return reference(normed, w64, bias), h


@pytest.mark.parametrize("with_res", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("cfg,K,weights", NORM_PATHS, ids=[p[0].replace(" ", "-") for p in NORM_PATHS])
def test_norm_prologue_equals_rms_norm_then_linear_and_writes_the_new_residual(cfg, K, weights, with_res,
                                                                               poisoned_workspace):
    """skinny_norm_linear: every kernel path (splits sum their shares of the sums of squares too), uneven K
    tails, partial column tiles; the new residual is the torch sum, every element written once."""
    g = torch.Generator().manual_seed(K + with_res)
    N, M = 40, 3
    w, scale, w64 = make_weights(weights, N, K, torch.float32, g)
    x, res = 3 * torch.randn(M, K, generator=g), torch.randn(M, K, generator=g)
    nw = 1 + 0.3 * torch.randn(K, generator=g)
    bias = torch.randn(N, generator=g)
    want, want_res = norm_reference(x, res if with_res else None, nw, 1e-5, w64, bias)
    res_out = torch.full((M, K), float("nan"), device=DEV)
    out = torch.full((M, N), float("nan"), device=DEV)
    norm = sg.RMSNormIn(res.to(DEV) if with_res else None, nw.to(DEV), 1e-5)
    y, new_res = sg.skinny_norm_linear(x.to(DEV), norm, w, scale, bias.to(DEV), config=C(cfg), out=out,
                                       residual_out=res_out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    tol = 1e-3 if cfg.startswith("dotH") else 1e-5  # dotH's fp16 operand rounds (x + res) * nw (2**-11)
    torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())
    if with_res:
        assert new_res.data_ptr() == res_out.data_ptr()
        assert torch.equal(new_res.cpu(), want_res)
    else:
        assert new_res is None and torch.isnan(res_out).all()  # nothing written without a residual


def test_norm_linear_rejects_mismatched_norm_inputs():
    w, x = torch.randn(8, 32), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"norm weight must be a contiguous \[32\]"):
        sg.skinny_norm_linear(x, sg.RMSNormIn(None, torch.ones(16), 1e-6), w)
    with pytest.raises(ValueError, match="residual must be"):
        sg.skinny_norm_linear(x, sg.RMSNormIn(torch.ones(2, 16), torch.ones(32), 1e-6), w)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        sg.skinny_norm_linear(x[None], sg.RMSNormIn(None, torch.ones(32), 1e-6), w)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_decoder_layers_fuse_both_norms_into_skinny_matmuls_with_the_same_greedy_tokens(quantization, monkeypatch,
                                                                                       tiny_model):
    """linear.norm_linear through the whole model: with the GPU's routing stood in for (the skinny kernel,
    interpreted, up to 4 rows), each layer's two norms run inside the qkv and gate_up matmuls of every decode
    step, and greedy decoding gives the tokens of the unfused norm + matmul; with fp8 weights only where
    FUSE_NORM_FP8 asks for it."""
    from pagedbatch import InferenceEngine, SamplingParams
    from pagedbatch.engine.models import linear as linear_mod

    real_route = linear_mod.route
    monkeypatch.setattr(linear_mod, "route", lambda M, N, K, dt, dev, fp8: "skinny" if M <= 4
                        else real_route(M, N, K, dt, dev, fp8))
    calls = []
    real = sg.skinny_norm_linear
    monkeypatch.setattr(sg, "skinny_norm_linear", lambda x, norm, *a, **k: calls.append(
        (x.shape[0], norm.residual is not None)) or real(x, norm, *a, **k))
    d = tiny_model("llama")
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8, 1, 4, 6, 2], [11, 12]]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def run():
        eng = InferenceEngine(d, quantization=quantization, skip_tokenizer_init=True, max_num_seqs=4)
        return [o.token_ids for o in eng.generate(prompts, greedy)], eng.engine.runner.model.args.num_layers

    monkeypatch.setattr(linear_mod, "FUSE_NORM", False)
    want, layers = run()
    assert not calls
    monkeypatch.setattr(linear_mod, "FUSE_NORM", True)
    if quantization == "fp8":  # not fused in front of fp8 weights unless asked (linear.FUSE_NORM_FP8)
        assert run()[0] == want and not calls
        monkeypatch.setattr(linear_mod, "FUSE_NORM_FP8", True)
    got, _ = run()
    assert got == want
    steps = len(calls) // (2 * layers)
    assert steps >= 3 and len(calls) == 2 * layers * steps, calls  # qkv and gate_up of every layer and step
    # The first layer's input norm has no residual to add (its residual is the embedding itself).
    assert sum(not has_res for _, has_res in calls) == steps


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_decoder_layers_rotate_and_cache_in_the_qkv_matmul_with_the_same_greedy_tokens(kv, monkeypatch, tiny_model):
    """linear.FUSE_ROPE through the whole model with the Triton backend (interpreted) and the GPU's routing
    stood in for: every decode step's qkv matmul of every layer takes rope= and the backend only attends;
    greedy tokens are those of the rotary kernel's path, with a float32 and with an fp8 cache; Qwen3's q/k
    norms keep the rotary kernel (they need whole heads)."""
    from pagedbatch import InferenceEngine, SamplingParams
    from pagedbatch.engine.models import linear as linear_mod

    real_route = linear_mod.route
    monkeypatch.setattr(linear_mod, "route", lambda M, N, K, dt, dev, fp8: "skinny" if M <= 4
                        else real_route(M, N, K, dt, dev, fp8))
    calls = []
    real = sg.skinny_norm_linear
    monkeypatch.setattr(sg, "skinny_norm_linear", lambda *a, rope=None, **k: calls.append(rope is not None)
                        or real(*a, rope=rope, **k))
    prompts = [[5, 9, 13, 2, 7], [11, 12]]  # small: the interpreter runs every attention kernel too
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def run(kind):
        eng = InferenceEngine(tiny_model(kind), skip_tokenizer_init=True, max_num_seqs=4, attention_backend="triton",
                              kv_cache_dtype=kv)
        return [o.token_ids for o in eng.generate(prompts, greedy)], eng.engine.runner.model.args.num_layers

    monkeypatch.setattr(linear_mod, "FUSE_ROPE", False)
    want, layers = run("llama")
    assert not any(calls)
    monkeypatch.setattr(linear_mod, "FUSE_ROPE", True)
    calls.clear()
    got, _ = run("llama")
    assert got == want
    assert sum(calls) >= 2 * layers and sum(calls) * 2 == len(calls), calls  # qkv of every layer and step
    calls.clear()
    run("qwen3")
    assert calls and not any(calls)


ROPE_PATHS = ["fma bm1 bn8 bk32 sk1 w4 st2", "fma bm4 bn4 bk32 sk2 w4 st2", "dot bm16 bn32 bk32 sk1 w4 st2",
              "dotT bm16 bn16 bk32 sk3 w4 st2"]


def rope_case(M, cache, seed=0, H=4, KVH=2, D=16, BS=4, K=96):
    """A qkv projection's inputs and two identical caches with every slot holding other data (fp32 random,
    or random e4m3 bytes), with one padding row (slot -1) when M > 1."""
    from pagedbatch.engine.attention.kv_quant import FP8_KV_DTYPE

    g = torch.Generator().manual_seed(seed)
    N = (H + 2 * KVH) * D
    w, _, w64 = make_weights("fp32", N, K, torch.float32, g)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g)
    positions = torch.randint(0, 40, (M,), generator=g)
    slots = torch.randperm(6 * BS, generator=g)[:M]
    if M > 1:
        slots[1] = -1
    if cache == "fp8":
        kc = torch.randint(0, 120, (6, BS, KVH, D), generator=g, dtype=torch.uint8).view(FP8_KV_DTYPE)
        vc = torch.randint(0, 120, (6, BS, KVH, D), generator=g, dtype=torch.uint8).view(FP8_KV_DTYPE)
        kv_scale = torch.tensor([0.05, 0.02])
    else:
        kc, vc, kv_scale = torch.randn(6, BS, KVH, D, generator=g), torch.randn(6, BS, KVH, D, generator=g), None
    f = torch.arange(64).float()[:, None] / (10000 ** (torch.arange(0, D, 2).float() / D))[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    return dict(x=x, w=w, bias=bias, positions=positions, slots=slots, kc=kc, vc=vc, kv_scale=kv_scale,
                cos_sin=cos_sin, q_size=H * D, kv_size=KVH * D, D=D)


def same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn \
        else torch.equal(a, b)


def same_sums(a, b, cfg):
    """``same`` where the two results come from the same sums: on the GPU, and on the fma paths anywhere. The
    interpreter's tl.dot is numpy's matmul, whose summation order can change with a tile's column order (the
    rope epilogue's tiles interleave rotary pairs: numpy 2.4.6's matmul then differs in the last bit on 27 of
    the v columns' 96 values, which no rotation touches), so on the CPU the dot paths agree to a few fp32 ulps,
    and an fp8 cache to one e4m3 step where such an ulp crossed a rounding boundary."""
    if DEV == "cuda" or cfg.startswith("fma"):
        return same(a, b)
    fp8 = a.dtype == torch.float8_e4m3fn
    a, b = a.float(), b.float()
    return torch.allclose(a, b, rtol=0.125 if fp8 else 1e-6, atol=2 ** -9 if fp8 else 1e-5, equal_nan=True)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("cache", ["fp32", "fp8"])
@pytest.mark.parametrize("cfg", ROPE_PATHS)
def test_rope_epilogue_equals_the_matmul_then_rotary_cache_write(cfg, cache, norm, poisoned_workspace):
    """rope=: q and k rotated, k and v stored (fp8: quantized by the layer's scales) exactly as
    rotary_cache_write does with the matmul's output; a negative slot writes nothing."""
    from pagedbatch.engine.attention.triton_kernels import rotary_cache_write

    M = 1 if "bm1 " in cfg else 3
    c = rope_case(M, cache, seed=len(cfg) + norm)
    dev = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    nw = torch.linspace(0.5, 1.5, c["x"].shape[1]).to(DEV)
    res = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(9)).to(DEV)

    def matmul(**kw):
        if norm:
            return sg.skinny_norm_linear(dev["x"], sg.RMSNormIn(res, nw, 1e-6), dev["w"], None, dev["bias"],
                                         config=C(cfg), **kw)[0]
        return sg.skinny_linear(dev["x"], dev["w"], None, dev["bias"], config=C(cfg), **kw)

    qs, kvs, D = c["q_size"], c["kv_size"], c["D"]
    kc_ref, vc_ref = dev["kc"].clone(), dev["vc"].clone()
    y = matmul()
    q, k, v = (t.reshape(M, -1, D) for t in y.split([qs, kvs, kvs], dim=1))
    q_rot = rotary_cache_write(q, k, v, kc_ref, vc_ref, dev["cos_sin"], dev["positions"], dev["slots"],
                               kv_scale=dev["kv_scale"])
    kc, vc = dev["kc"].clone(), dev["vc"].clone()
    rope = sg.RopeCacheOut(dev["cos_sin"], dev["positions"], dev["slots"], kc, vc, dev["kv_scale"], qs, kvs)
    fused = matmul(rope=rope)
    assert same_sums(fused[:, :qs], q_rot.reshape(M, qs), cfg), "rotated q"
    assert same_sums(fused[:, qs + kvs:], y[:, qs + kvs:], cfg), "v"
    assert same_sums(kc, kc_ref, cfg) and same_sums(vc, vc_ref, cfg), "cache contents"
    assert not same(kc, dev["kc"]), "nothing was written"
    if cache == "fp32":  # the output's k columns come back rotated too (the cached keys): the same values
        keep = dev["slots"] >= 0
        k_out = fused[:, qs:qs + kvs].reshape(M, -1, D)[keep]
        assert torch.equal(k_out, kc.view(-1, *kc.shape[2:])[dev["slots"][keep]]), "rotated k in the output"


def test_rope_epilogue_refuses_shapes_it_cannot_rotate():
    c = rope_case(1, "fp32")
    rope = sg.RopeCacheOut(c["cos_sin"], c["positions"], c["slots"], c["kc"], c["vc"], None, c["q_size"] - 8,
                           c["kv_size"])
    with pytest.raises(ValueError, match="whole heads"):
        sg.skinny_linear(c["x"], c["w"], rope=rope)
    fp8_cache = rope_case(1, "fp8")
    rope = sg.RopeCacheOut(c["cos_sin"], c["positions"], c["slots"], fp8_cache["kc"], fp8_cache["vc"], None,
                           c["q_size"], c["kv_size"])
    with pytest.raises(ValueError, match="fp8 KV cache needs"):
        sg.skinny_linear(c["x"], c["w"], rope=rope)


@pytest.mark.parametrize("cfg,K,act", [("dotH bm16 bn32 bk32 sk3 w4 st2", 160, None),
                                        ("dotH bm16 bn32 bk32 sk1 w4 st2", 112, None),
                                        ("dotH bm16 bn32 bk32 sk2 w4 st2", 96, "silu_mul")])
def test_fp16_dot_of_fp8_weights_keeps_activations_beyond_fp16s_range(cfg, K, act, poisoned_workspace):
    """dotH computes in fp16 with x scaled by 2**-8: activations of 1e5 (beyond fp16's 65504) and 1e-4
    (fp16 subnormals unscaled) in one row come out as the float64 product of the bf16 values."""
    g = torch.Generator().manual_seed(K)
    N, M = 40, 3
    w, scale, w64 = make_weights("fp8", N, K, torch.float32, g)
    kx = 2 * K if act else K
    x = torch.randn(M, kx, generator=g)
    x[0, ::7] *= 400 if act else 1e5  # silu(gate) * up: products of ~1e5
    x[1, ::5] *= 1e-4
    x = x.to(torch.bfloat16).float()  # bf16 values, the engine's activations (dotH's scale for bf16 is 2**-8)
    y = run(x.to(DEV), w, scale, None, C(cfg), act=act)
    want = reference(x, w64, None, act=act)
    assert torch.isfinite(y).all()
    # silu(gate) * up of float32 x is not a bf16 value: fp16 rounds it (2**-12); the engine's bf16 is exact.
    tol = 1e-3 if act else 1e-5
    torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())
    with pytest.raises(ValueError, match="dotH.*fp8"):
        sg.skinny_linear(x.to(DEV), w64.float().to(DEV), act=act, config=C(cfg))


def test_split_k_leaves_counters_at_zero_and_repeats_exactly(poisoned_workspace):
    """The last-arriving split resets its tile's counter: a second call (a graph replay) reduces again."""
    g = torch.Generator().manual_seed(3)
    w, _, w64 = make_weights("fp32", 48, 128, torch.float32, g)
    x = torch.randn(2, 128, generator=g).to(DEV)
    cfg = C("fma bm2 bn16 bk32 sk4 w4 st2")
    first = run(x, w, None, None, cfg)
    locks = sg._lock_buffer(torch.device(DEV))
    assert int(locks.abs().sum()) == 0
    second = run(x, w, None, None, cfg)
    assert torch.equal(first, second)  # the partials are summed in split order: deterministic
    assert int(locks.abs().sum()) == 0


def test_leading_dims_and_an_empty_batch():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 32, generator=g).to(DEV)
    x = torch.randn(2, 1, 32, generator=g).to(DEV)
    y = sg.skinny_linear(x, w, config=C("fma bm2 bn8 bk32 sk1 w4 st1"))
    assert y.shape == (2, 1, 24)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    assert sg.skinny_linear(x[:0], w).shape == (0, 1, 24)


def test_bad_calls_raise_errors_that_say_what_was_expected():
    w = torch.randn(8, 32)
    x = torch.randn(1, 32)
    q, s = quantize(w)
    with pytest.raises(ValueError, match="weight_scale"):
        sg.skinny_linear(x, q)
    with pytest.raises(ValueError, match="expected 32"):
        sg.skinny_linear(torch.randn(1, 16), w)
    with pytest.raises(ValueError, match="expected 64 .*silu_mul"):
        sg.skinny_linear(x, w, act="silu_mul")
    with pytest.raises(ValueError, match="act must be"):
        sg.skinny_linear(x, w, act="gelu")
    with pytest.raises(ValueError, match="dtype"):
        sg.skinny_linear(x.double(), w)
    with pytest.raises(ValueError, match="contiguous"):
        sg.skinny_linear(x, torch.randn(32, 8).T)
    with pytest.raises(ValueError, match="tensor-core"):
        C("dot bm1 bn16 bk32 sk1 w4 st2")
    with pytest.raises(ValueError, match="power of two"):
        sg.SkinnyConfig(block_n=24)
    with pytest.raises(ValueError, match="not a skinny config"):
        C("fma bn16")
    with pytest.raises(ValueError, match="unroll must be >= 1"):
        C("fma bm1 bn8 bk512 sk1 w4 st4 u0")


def test_config_strings_round_trip():
    for text in ("fma bm1 bn16 bk256 sk4 w4 st4", "dotT bm16 bn128 bk128 sk1 w8 st3", "fma bm1 bn8 bk512 sk1 w4 st4 u2"):
        assert str(C(text)) == text
    assert C("fma bm1 bn8 bk512 sk1 w4 st4 u1") == C("fma bm1 bn8 bk512 sk1 w4 st4")


@pytest.fixture
def scratch_tuned(monkeypatch):
    """sg.TUNED as a copy for one test, the config cache cleared on both sides."""
    monkeypatch.setattr(sg, "TUNED", dict(sg.TUNED))
    sg._default_config.cache_clear()
    yield sg.TUNED
    sg._default_config.cache_clear()


def test_override_tuned_replaces_entries_the_default_config_then_uses(scratch_tuned):
    before = sg.default_config(1, 37888, 3584, FP8)
    new = "fma bm1 bn16 bk256 sk1 w4 st6"
    assert str(before) != new
    set_ = sg.override_tuned(f"1,37888,3584,fp8={new} ; 1,3584,18944,fp8,silu_mul=fma bm1 bn8 bk512 sk1 w4 st4")
    assert set_ == {(1, 37888, 3584, "fp8"): new, (1, 3584, 18944, "fp8", "silu_mul"): "fma bm1 bn8 bk512 sk1 w4 st4"}
    assert str(sg.default_config(1, 37888, 3584, FP8)) == new
    assert str(sg.default_config(1, 3584, 18944, FP8, "silu_mul")) == "fma bm1 bn8 bk512 sk1 w4 st4"
    assert sg.default_config(1, 37888, 3584, torch.bfloat16) == sg.SkinnyConfig.parse(scratch_tuned[(1, 37888, 3584,
                                                                                                     "bf16")])


@pytest.mark.parametrize("spec", ["3,37888,3584,fp8=fma bm1 bn8 bk512 sk1 w4 st4",  # 3 is not a bucket
                                  "1,37888,3584,int8=fma bm1 bn8 bk512 sk1 w4 st4",
                                  "1,37888,3584,fp8,gelu=fma bm1 bn8 bk512 sk1 w4 st4",
                                  "1,37888,fp8=fma bm1 bn8 bk512 sk1 w4 st4",
                                  "1,37888,3584,fp8 fma bm1 bn8 bk512 sk1 w4 st4",
                                  "1,37888,3584,fp8=fma bm1 bn8"])
def test_override_tuned_rejects_bad_items_and_changes_nothing(scratch_tuned, spec):
    before = dict(scratch_tuned)
    with pytest.raises(ValueError, match="not a tuned entry|not a skinny config"):
        sg.override_tuned("1,3584,3584,fp8=fma bm1 bn4 bk512 sk1 w4 st4;" + spec)
    assert scratch_tuned == before


def _decode_shapes(config_name: str, tp: int = 1):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "models" / config_name
    a = local_args(ModelArgs.from_hf_dict(json.loads(path.read_text())), TPShard(0, tp))
    hd = a.head_dim
    return {"qkv": (hd * (a.num_heads + 2 * a.num_kv_heads), a.hidden_size), "o": (a.hidden_size, hd * a.num_heads),
            "gate_up": (2 * a.intermediate_size, a.hidden_size), "down": (a.hidden_size, a.intermediate_size),
            "lm_head": (a.vocab_size, a.hidden_size)}


REAL_SHAPES = {f"{m}-tp{tp}-{k}": v for m in ("qwen2.5-7b.json", "qwen3-0.6b.json") for tp in (1, 2)
               for k, v in _decode_shapes(m, tp).items()}


def test_default_configs_are_launchable_for_every_decode_shape():
    """Table or heuristic, every real shape (and its tensor-parallel halves) gets a valid plan."""
    for name, (N, K) in REAL_SHAPES.items():
        assert K % 16 == 0, name
        for M in (1, 2, 3, 4, 8, 16, 32, 64):
            for dtype in (torch.bfloat16, FP8):
                for act in (None, "silu_mul"):
                    cfg = sg.default_config(M, N, K, dtype, act)
                    per_split, split = sg.split_plan(K, cfg)
                    assert per_split * (split - 1) < -(-K // cfg.block_k), (name, cfg)
                    if split > 1:
                        assert -(-N // cfg.block_n) * -(-M // cfg.block_m) <= sg._LOCK_SLOTS, (name, cfg)


def test_heuristic_splits_k_only_for_narrow_outputs():
    """o_proj/down_proj (N = hidden) cannot fill the GPU by columns alone; gate_up and the LM head can."""
    shapes = _decode_shapes("qwen2.5-7b.json")
    cfg = {k: sg._heuristic_config(1, N, K, "bf16", 132) for k, (N, K) in shapes.items()}
    assert cfg["o"].split_k > 1 and cfg["down"].split_k > 1
    assert cfg["gate_up"].split_k == 1 and cfg["lm_head"].split_k == 1
    assert sg._heuristic_config(16, *shapes["down"], "fp8", 132).kind == "dotH"  # fp16 MMA for fp8 weights
    assert sg._heuristic_config(16, *shapes["down"], "bf16", 132).kind == "dot"


def test_variant_rows_reach_every_bucket_and_specialization_of_m():
    """The runner's LM-head warm-up runs these row counts: between them every row count up to skinny_max_m
    must be met by one with the same tuning bucket and Triton specialization of M (1, multiple of 16,
    other), else that variant compiles mid-job when a shrinking batch first reaches it."""
    def variant_class(m):
        return sg.m_bucket(m), 1 if m == 1 else 16 if m % 16 == 0 else 0

    for dtype in (torch.bfloat16, FP8):
        rows = sg.variant_rows(dtype)
        assert max(rows) <= sg.skinny_max_m(dtype)
        covered = {variant_class(m) for m in rows}
        missing = [m for m in range(1, sg.skinny_max_m(dtype) + 1) if variant_class(m) not in covered]
        assert not missing, (dtype, rows, missing)


def test_l2_prefetch_covers_the_programs_own_k_share_within_its_budget():
    fma = C("fma bm1 bn8 bk512 sk1 w4 st4")
    assert sg.prefetch_lines(3584, 1, 7, fma, budget=0) == 0  # off
    assert sg.prefetch_lines(3584, 1, 7, fma, budget=1 << 20) == 28  # a whole fp8 row of 3,584 bytes
    assert sg.prefetch_lines(3584, 2, 14, C("fma bm1 bn8 bk256 sk1 w4 st4"), budget=1 << 20) == 56  # bf16
    assert sg.prefetch_lines(3584, 1, 7, fma, budget=16384) == 16  # 8 rows x 16 lines = 16 KB
    split = C("fma bm1 bn16 bk512 sk4 w4 st4")  # 37 tiles of K 18,944: 10 a split, 5,120 bytes
    assert sg.prefetch_lines(18944, 1, sg.split_plan(18944, split)[0], split, budget=1 << 20) == 40
    assert sg.prefetch_lines(100, 2, 1, C("fma bm1 bn8 bk256 sk1 w4 st4"), budget=1 << 20) == 2  # a short row


def test_not_supported_off_the_gpu_or_for_unaligned_k():
    assert not sg.skinny_supported(1, 4608, 3584, torch.bfloat16, "cpu")
    assert sg.skinny_max_m() == min(sg.MAX_M.values())
    assert sg.skinny_max_m(FP8) == sg.MAX_M["fp8"]
    if torch.cuda.is_available():
        assert sg.skinny_supported(1, 4608, 3584, torch.bfloat16, "cuda")
        assert not sg.skinny_supported(1, 4608, 3592 - 1, torch.bfloat16, "cuda")
        assert not sg.skinny_supported(sg.skinny_max_m(torch.bfloat16) + 1, 4608, 3584, torch.bfloat16, "cuda")
        assert not sg.skinny_supported(1, 4608, 3584, torch.float32, "cuda")


# --------------------------------------------------------------------------
# GPU: real shapes, bf16 and fp8, graphs
# --------------------------------------------------------------------------


def _gpu_case(N, K, M, wdtype, xdtype=torch.bfloat16, bias=False, act=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    x = torch.randn(M, 2 * K if act else K, device="cuda", generator=g).to(xdtype)
    b = torch.randn(N, device="cuda", generator=g).to(xdtype) if bias else None
    if wdtype == FP8:
        w, scale = quantize(w)
        w_deq = w.float() * scale[:, None]
    else:
        w, scale = w.to(wdtype), None
        w_deq = w.float()
    xa = x.float()
    if act:
        gate, up = xa.chunk(2, dim=-1)
        # The operand the kernel multiplies: silu rounded to x's dtype, then the product (silu_and_mul's points).
        xa = (F.silu(gate).to(xdtype).float() * up).to(xdtype).float()
    ref = xa @ w_deq.T + (b.float() if bias else 0)
    return x, w, scale, b, ref


def _assert_close_to_fp32(y, ref):
    assert torch.isfinite(y).all(), "an output element was not written (or a NaN partial was read)"
    err = (y.float() - ref).abs()
    # One bf16 rounding of the output (2**-8 relative) plus float32 reassociation.
    bound = ref.abs() / 128 + 1e-3 * ref.abs().max()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} (max |ref| {ref.abs().max().item():.3g})"


GPU_SHAPES = {k: v for k, v in REAL_SHAPES.items() if "tp1" in k or k.endswith(("-o", "-down"))}


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_default_config_at_real_shapes(shape, wdtype, M, poisoned_workspace):
    N, K = GPU_SHAPES[shape]
    x, w, scale, b, ref = _gpu_case(N, K, M, wdtype, bias=shape.endswith("qkv"))
    _assert_close_to_fp32(run(x, w, scale, b, None), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [3, 64])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_gpu_default_config_at_other_batch_sizes(wdtype, M, poisoned_workspace):
    for N, K in (REAL_SHAPES["qwen2.5-7b.json-tp1-qkv"], REAL_SHAPES["qwen2.5-7b.json-tp1-down"]):
        x, w, scale, b, ref = _gpu_case(N, K, M, wdtype, bias=True)
        _assert_close_to_fp32(run(x, w, scale, b, None), ref)


GPU_PATHS = ["fma bm1 bn16 bk256 sk1 w4 st4", "fma bm1 bn16 bk512 sk4 w8 st3", "fma bm4 bn4 bk256 sk2 w4 st4",
             "fma bm1 bn8 bk512 sk1 w4 st4 u2", "fma bm1 bn16 bk512 sk4 w8 st3 u2",
             "fma bm4 bn4 bk256 sk1 w4 st1", "dot bm16 bn64 bk128 sk4 w4 st4", "dot bm16 bn32 bk256 sk1 w4 st3",
             "dotT bm16 bn64 bk128 sk1 w4 st4", "dotT bm16 bn128 bk128 sk8 w4 st3", "dot bm64 bn64 bk128 sk2 w4 st3"]


@pytest.mark.gpu
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("wkind", ["16bit", "fp8"])
@pytest.mark.parametrize("cfg", GPU_PATHS)
def test_gpu_every_kernel_path_compiles_and_matches(cfg, wkind, xdtype, poisoned_workspace):
    wdtype = FP8 if wkind == "fp8" else xdtype
    for N, K in ((3584, 3584), (1024, 1792)):  # 7B o_proj; a small tp shard whose K (1792) has a tail at bk 512
        x, w, scale, b, ref = _gpu_case(N, K, 3, wdtype, xdtype=xdtype, bias=True)
        _assert_close_to_fp32(run(x, w, scale, b, C(cfg)), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("cfg", ["fma bm1 bn16 bk256 sk4 w4 st4", "dot bm16 bn64 bk128 sk8 w4 st4"])
def test_gpu_silu_mul_prologue_equals_silu_and_mul_then_linear(cfg, wdtype):
    from pagedbatch.engine.models.fused_ops import silu_and_mul

    N, K = REAL_SHAPES["qwen2.5-7b.json-tp1-down"]
    gate_up, w, scale, _, ref = _gpu_case(N, K, 3, wdtype, act="silu_mul")
    fused = sg.skinny_linear(gate_up, w, scale, act="silu_mul", config=C(cfg))
    unfused = sg.skinny_linear(silu_and_mul(gate_up), w, scale, config=C(cfg))
    assert torch.equal(fused, unfused)  # same rounding points, same summation order
    _assert_close_to_fp32(fused, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", ["qwen2.5-7b.json-tp1-qkv", "qwen2.5-7b.json-tp1-gate_up",
                                   "qwen3-0.6b.json-tp1-qkv"])
def test_gpu_norm_linear_at_real_shapes(shape, wdtype, M, poisoned_workspace):
    """The fused norm with its default config (Qwen3-0.6B's qkv at 16 rows splits K) against the float32 norm + matmul;
    the new residual is the bf16 torch sum; the unfused pair (which rounds the normalised row twice more) is
    no closer to the float32 result."""
    from pagedbatch.engine.models.fused_ops import rms_norm

    N, K = REAL_SHAPES[shape]
    x, w, scale, b, _ = _gpu_case(N, K, M, wdtype, bias=shape.endswith("qkv"))
    g = torch.Generator(device="cuda").manual_seed(1)
    res = (4 * torch.randn(M, K, device="cuda", generator=g)).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    h = x + res
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
    operand = hf * nw.float()
    if sg.default_config(M, N, K, wdtype).kind in ("dot", "dotT"):
        operand = operand.to(torch.bfloat16).float()  # bf16 tensor cores take the operand rounded once
    w_deq = w.float() * scale[:, None] if scale is not None else w.float()
    ref = (operand @ w_deq.T) * rstd + (b.float() if b is not None else 0)
    res_out = torch.full_like(x, float("nan"))
    y, new_res = sg.skinny_norm_linear(x, sg.RMSNormIn(res, nw, 1e-6), w, scale, b, residual_out=res_out)
    assert torch.equal(new_res, h), "the new residual is not the torch sum"
    _assert_close_to_fp32(y, ref)
    exact = (hf * rstd * nw.float()) @ w_deq.T + (b.float() if b is not None else 0)
    unfused = sg.skinny_linear(rms_norm(x, nw, 1e-6, res)[0], w, scale, b)
    err, err_unfused = (y.float() - exact).norm().item(), (unfused.float() - exact).norm().item()
    assert err <= 1.05 * err_unfused, (err, err_unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_gpu_rope_epilogue_equals_rotary_cache_write_at_qwen25_7b_qkv(wdtype, cache, M, poisoned_workspace):
    """rope= with the norm fused, default configs (16 rows: tensor cores and split-K), a 16-token-block cache
    of 28 q / 4 kv heads of 128, one padding slot: the fp8 cache's bytes and q are those of the unfused path
    (both rotate without contracted multiply-adds); a bf16 cache's k and q within one bf16 rounding of it
    (rotary_cache_write contracts there)."""
    from pagedbatch.engine.attention.kv_quant import FP8_KV_DTYPE
    from pagedbatch.engine.attention.triton_kernels import rotary_cache_write

    N, K = REAL_SHAPES["qwen2.5-7b.json-tp1-qkv"]
    x, w, scale, b, _ = _gpu_case(N, K, M, wdtype, bias=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    res = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    H, KVH, D, BS = 28, 4, 128, 16
    f = torch.arange(4096, device="cuda").float()[:, None] / (1e6 ** (torch.arange(0, D, 2, device="cuda") / D))
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    positions = torch.randint(0, 4096, (M,), device="cuda", generator=g)
    slots = torch.randperm(64 * BS, device="cuda", generator=g)[:M]
    if M > 1:
        slots[1] = -1
    if cache == "fp8":
        kc = torch.randint(0, 120, (64, BS, KVH, D), device="cuda", generator=g, dtype=torch.uint8).view(FP8_KV_DTYPE)
        kv_scale = torch.tensor([0.03, 0.02], device="cuda")
    else:
        kc, kv_scale = torch.randn(64, BS, KVH, D, device="cuda", generator=g).to(torch.bfloat16), None
    vc, kc0 = kc.clone(), kc.clone()
    norm = sg.RMSNormIn(res, nw, 1e-6)
    y, _ = sg.skinny_norm_linear(x, norm, w, scale, b)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q, k, v = (t.reshape(M, -1, D) for t in y.split([H * D, KVH * D, KVH * D], dim=1))
    q_rot = rotary_cache_write(q, k, v, kc_ref, vc_ref, cos_sin, positions, slots, kv_scale=kv_scale)
    rope = sg.RopeCacheOut(cos_sin, positions, slots, kc, vc, kv_scale, H * D, KVH * D)
    fused, _ = sg.skinny_norm_linear(x, norm, w, scale, b, rope=rope)
    assert torch.equal(fused[:, H * D + KVH * D:], y[:, H * D + KVH * D:]), "v columns"
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8)), "v cache"
    if cache == "fp8":
        assert torch.equal(fused[:, :H * D], q_rot.reshape(M, -1)), "q"
        assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8)), "k cache bytes"
    else:
        torch.testing.assert_close(fused[:, :H * D], q_rot.reshape(M, -1), rtol=2 ** -7, atol=1e-6)
        torch.testing.assert_close(kc, kc_ref, rtol=2 ** -7, atol=1e-6)
        assert (fused[:, :H * D] == q_rot.reshape(M, -1)).float().mean() > 0.99
    assert not torch.equal(kc.view(torch.uint8), kc0.view(torch.uint8)), "nothing written"


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [4096, 1 << 20])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_gpu_l2_prefetch_changes_no_bits(wdtype, budget, monkeypatch, poisoned_workspace):
    # The prefetch is a hint to L2 issued before the PDL wait: the results must be bit for bit those without
    # it, for one-row and split-K configs and with a K share that is not a whole number of lines.
    for (N, K), cfg, M in ((REAL_SHAPES["qwen2.5-7b.json-tp1-qkv"], None, 1),
                           (REAL_SHAPES["qwen2.5-7b.json-tp1-down"], None, 1),
                           ((1024, 1808), C("fma bm1 bn16 bk512 sk3 w4 st4"), 1),
                           (REAL_SHAPES["qwen2.5-7b.json-tp1-o"], None, 16)):
        x, w, scale, b, ref = _gpu_case(N, K, M, wdtype, bias=True)
        monkeypatch.setattr(sg, "L2_PREFETCH_BYTES", 0)
        plain = run(x, w, scale, b, cfg)
        monkeypatch.setattr(sg, "L2_PREFETCH_BYTES", budget)
        assert torch.equal(run(x, w, scale, b, cfg), plain)
        _assert_close_to_fp32(plain, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_gpu_cuda_graph_replays_match_eager_calls(wdtype):
    calls = [(REAL_SHAPES["qwen2.5-7b.json-tp1-qkv"], None, True),
             (REAL_SHAPES["qwen2.5-7b.json-tp1-o"], C("fma bm1 bn16 bk256 sk4 w4 st4"), False),
             (REAL_SHAPES["qwen2.5-7b.json-tp1-down"], C("dot bm16 bn64 bk128 sk8 w4 st4"), False)]
    cases = [(_gpu_case(N, K, 2, wdtype, bias=bias, seed=i), cfg) for i, ((N, K), cfg, bias) in enumerate(calls)]
    static_x = [c[0][0].clone() for c in cases]

    def step():
        return [sg.skinny_linear(sx, w, s, b, config=cfg) for sx, ((_, w, s, b, _), cfg) in zip(static_x, cases)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile, create the split-K counters
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in range(3):
        for sx in static_x:
            sx.copy_(torch.randn(sx.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        eager = step()
        for got, want in zip(outs, eager):
            assert torch.equal(got, want)
    assert int(sg._lock_buffer(torch.device("cuda")).abs().sum()) == 0
