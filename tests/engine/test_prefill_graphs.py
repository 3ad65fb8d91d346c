"""CUDA graphs for steps with prefill (engine/cuda_graphs.PrefillGraphs): a step padded to its token bucket
computes exactly what it computes unpadded, and the engine's outputs do not depend on whether its small
prefill steps replay graphs. Also what a decode graph's static inputs hold when it replays (DecodeGraphs.run)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedbatch.config import EngineConfig  # noqa: E402
from pagedbatch.engine.attention.triton_paged import TritonAttentionBackend  # noqa: E402
from pagedbatch.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_buckets  # noqa: E402
from test_triton_paged import DEV, make_batch  # noqa: E402


def test_prefill_buckets_double_from_16_then_step_by_1024_up_to_the_cap():
    assert prefill_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_buckets(300) == [16, 32, 64, 128, 256, 300]
    assert prefill_buckets(16) == [16]
    assert prefill_buckets(5) == [5]
    assert prefill_buckets(8192) == [16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192]
    assert prefill_buckets(3000) == [16, 32, 64, 128, 256, 512, 1024, 2048, 3000]


def test_by_default_every_step_with_prefill_replays_a_graph():
    """The default cap covers the default step size: no step of a default engine launches eagerly (eager
    8,192-token steps with fp8 weights were host-bound on a slow host; config.py)."""
    c = EngineConfig(model="m")
    assert c.prefill_graph_max_tokens >= c.max_num_batched_tokens


def test_prefill_graph_max_tokens_must_be_a_non_negative_integer():
    assert EngineConfig(model="m", prefill_graph_max_tokens=0).prefill_graph_max_tokens == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prefill_graph_max_tokens"):
            EngineConfig(model="m", prefill_graph_max_tokens=bad)


def test_a_decode_graph_sees_the_steps_inputs_from_one_copy_of_ids_positions_slots_and_int64_tables():
    """DecodeGraphs.run with the step's [3, b] ids/positions/slots view and int64 seq_lens and block tables
    (StepInputBuilder.build(int32=False)) fills the static buffers exactly as with int32 inputs, padding rows
    pointed at the scratch block; no model is needed to check what the graph would see."""
    import random

    from pagedbatch.engine.scheduler import SchedulerOutput
    from pagedbatch.engine.step_inputs import StepInputBuilder
    from test_step_inputs import _seq

    class Seen:  # a captured graph's stand-in: what the static buffers hold at replay
        def __init__(self, g):
            self.g, self.seen = g, None

        def replay(self):
            g = self.g
            self.seen = [t.clone() for t in (g.ids, g.positions, g.slots, g.seq_lens, g.block_tables, g.qsl)]

    rng, bs = random.Random(3), 16
    seqs = [_seq(i, rng.randint(2, 90), 0, bs, rng) for i in range(5)]
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    plan = SchedulerOutput(seqs=seqs, num_new_tokens=[1] * 5)
    runs = []
    for int32 in (True, False):
        g = DecodeGraphs(None, None, None, None, max_batch=16, max_blocks_per_seq=8, max_model_len=128,
                         scratch_block=99, block_size=bs, hidden_size=1, dtype=torch.float32, device=DEV)
        g.block_tables.fill_(-7)  # stale columns past the step's width must stay as they were
        g.graphs = {b: Seen(g) for b in g.buckets}
        inputs = StepInputBuilder(torch.device(DEV), bs, max_blocks_per_seq=8).build(plan, int32=int32)
        g.run(inputs.ids_positions_slots(), inputs.meta)
        runs.append(g.graphs[8].seen)
        assert not any(v.seen for b, v in g.graphs.items() if b != 8)  # 5 rows replay bucket 8
    for want, got in zip(*runs):
        assert want.dtype == got.dtype and torch.equal(want, got)
    ids, pos, slots, seq_lens, tables, _ = runs[1]
    assert ids[:5].tolist() == [s.token_ids[-1] for s in seqs] and pos[:5].tolist() == [s.num_tokens - 1 for s in seqs]
    assert (slots[5:8] == 99 * bs).all() and (pos[5:8] == 0).all() and (seq_lens[5:8] == 1).all()
    assert (tables[5:8, 0] == 99).all() and tables.dtype == seq_lens.dtype == torch.int32
    assert tables[0, : len(seqs[0].block_table)].tolist() == seqs[0].block_table


def _graphs(max_tokens, max_seqs, width, scratch_block, block_size):
    # stage() only fills the static buffers: no model is needed to check what the graph would see.
    return PrefillGraphs(None, None, None, None, max_tokens=max_tokens, max_seqs=max_seqs, max_blocks_per_seq=width,
                         max_model_len=4096, scratch_block=scratch_block, block_size=block_size, hidden_size=1,
                         dtype=torch.float32, device=DEV)


def _batch_with_scratch(ctx_lens, q_lens, heads, kv_heads, bs=16):
    """make_batch's fp32 batch with one more cache block past the batch's own, the scratch block (its id last)."""
    q, k, v, kc, vc, cs, meta = make_batch(ctx_lens, q_lens, heads=heads, kv_heads=kv_heads, head_dim=32,
                                           block_size=bs, dtype=torch.float32)
    scratch = kc.shape[0]
    kc = torch.cat([kc, torch.zeros_like(kc[:1])])
    vc = torch.cat([vc, torch.zeros_like(vc[:1])])
    return q, k, v, kc, vc, cs, meta, scratch


def _assert_padded_attends_as_unpadded(q, k, v, kc, vc, cs, meta, pmeta, scratch):
    """The Triton backend on the step padded to ``pmeta`` (NaN q/k/v in the padding rows) gives the unpadded
    step's rows and writes no cache slot outside the scratch block differently."""
    T, size = meta.num_tokens, pmeta.num_tokens

    def pad(x):
        return torch.cat([x, torch.full((size - T,) + x.shape[1:], float("nan"), dtype=x.dtype, device=x.device)])

    be = TritonAttentionBackend()
    scale = 32**-0.5
    kc1, vc1 = kc.clone(), vc.clone()
    want = be.forward(q, k, v, kc1, vc1, cs, meta, scale)
    kc2, vc2 = kc.clone(), vc.clone()
    got = be.forward(pad(q), pad(k), pad(v), kc2, vc2, cs, pmeta, scale)
    assert torch.isfinite(got[:T]).all()
    torch.testing.assert_close(got[:T], want, rtol=1e-5, atol=1e-5)
    real = slice(0, scratch)
    assert torch.equal(kc2[real].nan_to_num(7.0), kc1[real].nan_to_num(7.0))
    assert torch.equal(vc2[real].nan_to_num(7.0), vc1[real].nan_to_num(7.0))


@pytest.mark.parametrize("ctx_lens,q_lens", [([30, 0, 45], [18, 9, 1]), ([0], [20]), ([3, 0], [1, 2])])
def test_a_step_padded_to_its_bucket_attends_and_writes_the_cache_as_unpadded(ctx_lens, q_lens):
    """The Triton backend (prefill kernel and fused rotary + cache write) on the padded batch the graph replays:
    padding tokens (NaN q/k/v) and empty sequences change no real row and no cache slot but the scratch block's."""
    bs = 16
    q, k, v, kc, vc, cs, meta, scratch = _batch_with_scratch(ctx_lens, q_lens, heads=4, kv_heads=2, bs=bs)
    g = _graphs(64, 8, meta.block_tables.shape[1] + 3, scratch, bs)
    T = meta.num_tokens
    size, pmeta = g.stage(torch.arange(T, device=DEV), meta)
    assert size == max(16, 1 << (T - 1).bit_length()) and pmeta.num_tokens == size and pmeta.num_seqs == min(size, 8)
    assert g.qsl[: pmeta.num_seqs + 1].tolist() == meta.query_start_loc.tolist() + [T] * (pmeta.num_seqs - meta.num_seqs)
    assert (g.slots[T:size] == scratch * bs).all() and (g.positions[T:size] == 0).all()
    _assert_padded_attends_as_unpadded(q, k, v, kc, vc, cs, meta, pmeta, scratch)


def test_a_step_padded_to_a_bucket_past_the_doubling_ones_attends_as_unpadded(monkeypatch):
    """Above PREFILL_BUCKET_STEP the buckets are its multiples, not powers of two: a 70-token step (buckets
    16, 32, 64, 96, 128 at a step of 32) pads to 96 and attends and writes the cache as unpadded."""
    from pagedbatch.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "PREFILL_BUCKET_STEP", 32)
    q, k, v, kc, vc, cs, meta, scratch = _batch_with_scratch([10, 0], [40, 30], heads=2, kv_heads=1)
    g = _graphs(128, 4, meta.block_tables.shape[1] + 3, scratch, 16)
    assert g.buckets == [16, 32, 64, 96, 128]
    size, pmeta = g.stage(torch.arange(70, device=DEV), meta)
    assert size == 96 and pmeta.num_tokens == 96 and pmeta.num_seqs == 4
    _assert_padded_attends_as_unpadded(q, k, v, kc, vc, cs, meta, pmeta, scratch)


def test_a_step_larger_than_the_last_bucket_is_not_the_graphs():
    g = _graphs(32, 8, 4, 0, 16)
    _, _, _, _, _, _, meta = make_batch([0, 0], [20, 13], heads=4, kv_heads=2, head_dim=32, block_size=16,
                                        dtype=torch.float32)
    assert not g.fits(meta)  # 33 tokens
    _, _, _, _, _, _, meta = make_batch([0, 0], [20, 12], heads=4, kv_heads=2, head_dim=32, block_size=16,
                                        dtype=torch.float32)
    assert g.fits(meta)
    _, _, _, _, _, _, meta = make_batch([5, 9], [1, 1], heads=4, kv_heads=2, head_dim=32, block_size=16,
                                        dtype=torch.float32)
    assert not g.fits(meta)  # decode-only: the decode graphs' step


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_engine_tokens_with_prefill_graphs_equal_eager_prefill_and_steps_replay_them(tmp_path, kind):
    """float32 greedy through chunked prefill, prefix-cache hits and mixed steps: identical token ids with the
    small prefill steps replayed from graphs and run eagerly, and the graphs did run."""
    from model_factory import build_model
    from pagedbatch import InferenceEngine, SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    d = build_model(kind, tmp_path / kind)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 300, (40,), generator=g).tolist()
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 90, 200)]
    prompts += [shared + torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 30)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = {}
    for cap in (0, 128):
        eng = InferenceEngine(d, dtype="float32", device="cuda", max_num_batched_tokens=96, max_num_seqs=4,
                              gpu_memory_utilization=0.3, prefill_graph_max_tokens=cap)
        runner = eng.engine.runner
        got[cap] = [o.token_ids for o in eng.generate(prompts, params)]
        if cap:
            assert runner.prefill_graphs is not None and runner.prefill_graphs.max_tokens == 96
            assert runner.prefill_graphs.replays >= 5
        else:
            assert runner.prefill_graphs is None
        del eng, runner
    assert got[128] == got[0]


def test_job_option_is_checked_before_any_model_is_read(tmp_path):
    """A bad --prefill-graph-max-tokens stops the job runner before any model is read, naming the option (the
    server's option reaching the config: tests/server/test_serve_quantization.py)."""
    from click.testing import CliRunner

    from model_factory import build_model
    from pagedbatch.cli import run

    model = build_model("llama", tmp_path / "llama")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    r = CliRunner().invoke(run, ["--input", str(src), "--output", str(tmp_path / "out"), "--model", str(model),
                                 "--device", "cpu", "--prefill-graph-max-tokens", "-1"])
    assert r.exit_code != 0 and "prefill_graph_max_tokens must be an integer >= 0" in r.output, r.output
