"""fp8 weights from every source: quantized at load, pre-quantized checkpoints in both published layouts, dummy
weights, tensor-parallel shards.

Pre-quantized checkpoints are written by ``fp8_checkpoints.py`` from the
same bf16 weights the quantize-at-load model reads. Per-channel and
per-tensor scales must load exactly (the dequantized weights equal the
checkpoint's; per-channel ones also equal quantizing at load bit for bit).
Block scales are re-quantized per channel: within one e4m3 rounding of the
checkpoint's values (quantization.py states the bound).
"""
import pytest
import torch

from fp8_checkpoints import checkpoint_weights, write_fp8_checkpoint
from model_factory import build_model
from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.models.config import ModelArgs
from pagedbatch.engine.models.fp8 import FP8, dequantize_rows, quantize_rows
from pagedbatch.engine.models.loader import load_model
from pagedbatch.engine.models.quantization import checkpoint_quant, resolve_quantization
from pagedbatch.engine.models.sharding import TPShard, split

CPU = torch.device("cpu")
# Our fused parameter -> its checkpoint tensors, in order.
FUSED = {"self_attn.qkv_proj_weight": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "self_attn.o_proj_weight": ["self_attn.o_proj"],
         "mlp.gate_up_proj_weight": ["mlp.gate_proj", "mlp.up_proj"],
         "mlp.down_proj_weight": ["mlp.down_proj"]}
# Kept small and odd: one KV head for two ranks, an intermediate size (129) that two ranks split unevenly.
ODD = dict(num_key_value_heads=1, vocab_size=381, intermediate_size=129)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied embeddings) whose checkpoint holds bf16 values."""
    return build_model("qwen2", tmp_path_factory.mktemp("fp8-src"), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_dir(src, tmp_path_factory):
    cache = {}

    def get(layout, ignore=None):
        key = (layout, tuple(ignore or ()))
        if key not in cache:
            cache[key] = write_fp8_checkpoint(src, str(tmp_path_factory.mktemp(layout)), layout, ignore=ignore)
        return cache[key]

    return get


def load(d, **kw):
    kw.setdefault("dtype", torch.float32)
    return dict(load_model(d, ModelArgs.from_dir(d), kw.pop("dtype"), CPU, **kw).named_parameters())


def dequantized(params, name):
    w = params[name]
    return dequantize_rows(w, params[name + "_scale"]) if w.dtype == FP8 else w.float()


def fused_checkpoint_weight(ck, layer, param):
    return torch.cat([ck[f"model.layers.{layer}.{m}.weight"] for m in FUSED[param]])


@pytest.mark.parametrize("layout", ["hf-tensor", "ct-channel", "ct-tensor"])
def test_per_channel_and_per_tensor_checkpoints_load_exactly(src, fp8_dir, layout):
    d = fp8_dir(layout)
    got = load(d)  # quantization None: the checkpoint's quantization_config turns fp8 on
    ck = checkpoint_weights(d, layout)
    at_load = load(src, quantization="fp8")
    for layer in range(2):
        for param in FUSED:
            name = f"layers.{layer}.{param}"
            assert got[name].dtype == FP8, name
            assert torch.equal(dequantized(got, name), fused_checkpoint_weight(ck, layer, param)), name
            if layout == "ct-channel":  # the same rule as quantizing at load: the same bits
                assert torch.equal(got[name].view(torch.uint8), at_load[name].view(torch.uint8)), name
                assert torch.equal(got[name + "_scale"], at_load[name + "_scale"]), name
    for name in ("embed_tokens", "layers.0.self_attn.qkv_proj_bias", "layers.1.input_layernorm.weight"):
        assert got[name].dtype == torch.float32 and torch.equal(got[name], at_load[name]), name


@pytest.mark.parametrize("layout", ["hf-block", "ct-block"])
def test_block_scaled_checkpoints_are_requantized_within_one_e4m3_rounding(src, fp8_dir, layout):
    d = fp8_dir(layout)
    got = load(d)
    ck = checkpoint_weights(d, layout)
    bf16 = load(src)  # the unquantized weights both were made from
    at_load = load(src, quantization="fp8")
    for layer in range(2):
        for param in FUSED:
            name = f"layers.{layer}.{param}"
            want = fused_checkpoint_weight(ck, layer, param)
            err = (dequantized(got, name) - want).abs()
            # One more rounding at the row's new scale: half an e4m3 step, 2**-4 relative in the
            # normal range, 2**-10 x the scale below it (plus float32 rounding of the products).
            row_scale = got[name + "_scale"][:, None]
            bound = torch.maximum(want.abs() * 2**-4, row_scale * 2**-10) * (1 + 1e-6)
            assert (err <= bound).all(), (name, (err / bound).max().item())
            assert err.max() > 0, "block scales cannot all map exactly: the test meant to re-quantize"
            # Two roundings cost at most twice one rounding's error against the original weights.
            ref = bf16[name]
            rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
            assert rms(dequantized(got, name) - ref) <= 2 * rms(dequantized(at_load, name) - ref), name


def test_checkpoint_ignore_lists_keep_those_modules_in_the_model_dtype(src, fp8_dir):
    # Hugging Face modules_to_not_convert (a module name) and compressed-tensors ignore (a regex) alike.
    for layout, ignore in (("hf-tensor", ["model.layers.0.mlp.down_proj"]),
                           ("ct-channel", [r"re:.*layers\.1\.self_attn\.k_proj"])):
        d = fp8_dir(layout, ignore)
        got = load(d)
        ck = checkpoint_weights(d, layout)
        kept = "layers.0.mlp.down_proj_weight" if layout == "hf-tensor" else "layers.1.self_attn.qkv_proj_weight"
        assert got[kept].dtype == torch.float32 and kept + "_scale" not in got
        # A fused parameter with one part unquantized keeps all of them in the model dtype: its fp8
        # parts are dequantized into it (float32 here: exactly the checkpoint's values).
        layer, param = int(kept.split(".")[1]), kept.split(".", 2)[2]
        assert torch.equal(got[kept], fused_checkpoint_weight(ck, layer, param))
        others = [n for n in got if n.endswith("proj_weight") and n != kept]
        assert others and all(got[n].dtype == FP8 for n in others)


def test_fp8_checkpoint_in_the_engine_generates_as_quantizing_at_load(src, fp8_dir):
    prompts = [[5, 17, 99, 3], [200, 1, 45]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    kw = dict(device="cpu", dtype="float32", num_kv_blocks=8)
    with InferenceEngine(fp8_dir("ct-channel"), **kw) as ckpt, InferenceEngine(src, quantization="fp8", **kw) as ql:
        assert ckpt.engine.quantization == "fp8"  # implied by the checkpoint
        a, b = ckpt.generate(prompts, greedy), ql.generate(prompts, greedy)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [lp.logprob for o in a for lp in o.logprobs] == [lp.logprob for o in b for lp in o.logprobs]


def test_quantization_config_errors_name_the_problem(src, fp8_dir, tmp_path):
    args = ModelArgs.from_dir(fp8_dir("hf-block"))
    assert resolve_quantization(None, args) == resolve_quantization("fp8", args) == "fp8"
    with pytest.raises(ValueError, match="quantization 'int8' conflicts with the checkpoint, whose weights are fp8"):
        resolve_quantization("int8", args)  # a value a later EngineConfig may allow
    bad = [({"quant_method": "awq", "bits": 4}, "quantized with 'awq'"),
           ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
           ({"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
            "format 'pack-quantized' is not supported"),
           ({"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}}},
            "strategy 'group' is not supported")]
    for qcfg, words in bad:
        with pytest.raises(ValueError, match=words):
            checkpoint_quant(qcfg)
    import json
    import shutil

    d = tmp_path / "awq"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pagedbatch loads only fp8 checkpoints"):
        InferenceEngine(str(d), device="cpu")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return build_model("llama3", tmp_path_factory.mktemp("fp8-odd"), dtype=torch.bfloat16, **ODD)


class _NoComm:
    """Stands in for a TP group when only the loaded weights are inspected."""

    def all_reduce(self, x):
        raise AssertionError("not run")


@pytest.mark.parametrize("source", ["bf16", "hf-block", "ct-channel", "dummy"])
def test_tp2_shards_hold_exact_slices_of_the_tp1_fp8_weights(odd, tmp_path, source):
    # Row-parallel shards (o_proj, down_proj) take each row's scale from the whole row, so they hold
    # the very bits the unsharded model holds; column-parallel shards take their rows' scales.
    d = odd if source in ("bf16", "dummy") else write_fp8_checkpoint(odd, str(tmp_path / source), source)
    kw = dict(quantization="fp8", load_format="dummy" if source == "dummy" else "auto")
    args = ModelArgs.from_dir(d)
    whole = load(d, **kw)
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    for rank in range(2):
        part = load(d, shard=TPShard(rank, 2), comm=_NoComm(), **kw)
        heads = slice(rank * q // 2, (rank + 1) * q // 2)
        start, count, local = split(args.intermediate_size, TPShard(rank, 2))
        inter = slice(start, start + count)
        for layer in range(args.num_layers):
            p = f"layers.{layer}."
            qkv = dequantized(whole, p + "self_attn.qkv_proj_weight")
            want = torch.cat([qkv[:q][heads], qkv[q: q + kv], qkv[q + kv:]])  # the one KV head is replicated
            assert torch.equal(dequantized(part, p + "self_attn.qkv_proj_weight"), want)
            assert torch.equal(dequantized(part, p + "self_attn.o_proj_weight"),
                               dequantized(whole, p + "self_attn.o_proj_weight")[:, heads])
            assert torch.equal(part[p + "self_attn.o_proj_weight_scale"], whole[p + "self_attn.o_proj_weight_scale"])
            gate_up = dequantized(part, p + "mlp.gate_up_proj_weight")
            whole_gu = dequantized(whole, p + "mlp.gate_up_proj_weight")
            inter_size = args.intermediate_size
            assert torch.equal(gate_up[:count], whole_gu[:inter_size][inter])
            assert torch.equal(gate_up[local: local + count], whole_gu[inter_size:][inter])
            assert not gate_up[count:local].any(), "padding rows are zero"
            down = dequantized(part, p + "mlp.down_proj_weight")
            assert torch.equal(down[:, :count], dequantized(whole, p + "mlp.down_proj_weight")[:, inter])
            assert not down[:, count:].any(), "padding columns are zero"


@pytest.mark.slow
def test_tp2_fp8_engine_quantizes_on_every_rank(odd):
    # Each rank reads the whole rows of its row-parallel weights once more for their maxima: the bytes
    # every rank read show that the worker quantized too. (Row-parallel activations are quantized per
    # rank, so outputs may differ from TP 1's by rounding; the shards' weights are exact: above.)
    args = ModelArgs.from_dir(odd)
    plain = [load_model(odd, args, torch.float32, CPU, shard=TPShard(r, 2), comm=_NoComm()).checkpoint_bytes_read
             for r in range(2)]
    # The whole o_proj and down_proj of every layer, bf16.
    extra = 2 * args.num_layers * args.hidden_size * (args.num_heads * args.head_dim + args.intermediate_size)
    kw = dict(device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=8, quantization="fp8")
    with InferenceEngine(odd, **kw) as fp8:
        assert fp8.engine.runner.bytes_read_per_rank == [b + extra for b in plain]
        out = fp8.generate([[5, 17, 99, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4


def test_dummy_fp8_weights_are_the_dummy_bf16_weights_quantized(odd):
    bf16 = load(odd, dtype=torch.bfloat16, load_format="dummy")
    fp8 = load(odd, dtype=torch.bfloat16, load_format="dummy", quantization="fp8")
    assert {n for n in fp8 if not n.endswith("_scale")} == set(bf16)
    for name, w in bf16.items():
        if fp8[name].dtype != FP8:
            assert torch.equal(fp8[name], w), name  # the same draws: norms, embeddings, biases
            continue
        q, s = quantize_rows(w)
        assert torch.equal(fp8[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(fp8[name + "_scale"], s), name
