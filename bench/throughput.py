"""Throughput of our engine on a named workload, with the peer and the roofline measured in the same run.

    python bench/throughput.py --workload W1                 # ours + Hugging Face static b64 + generate_batch
    python bench/throughput.py --workload W-nano --peers none
    python bench/throughput.py --workload single --peers hf-static --hf-batch 1    # one stream, 256 tokens
    python bench/throughput.py --workload prefill --peers hf-static --hf-batch 16  # 16 x 2,048-token prefills
    python bench/throughput.py --workload tiny --device cpu --peers none   # smoke test of the script
    python bench/throughput.py --workload single --peers none --quantization fp8    # fp8 weights
    python bench/throughput.py --workload single --peers none --tensor-parallel-size 2   # TP 2 (GPUs 0, 1)
    python bench/throughput.py --workload W1 --model-config llama3-70b.json --peers none --tensor-parallel-size 4

Model weights are random (load_format=dummy) on the architecture's real
config (configs/models/); prompts are random token ids; EOS is ignored.
``--model-config`` runs a workload's prompts on another shape (ids are
taken modulo its vocabulary). With ``--tensor-parallel-size N`` the roofline
is that of N GPUs (N times the measured bandwidth and matmul rate, see
roofline.py); the peers still run on one GPU. ``--quantization fp8`` runs our
engine with fp8 weights (the peers stay bf16); the roofline stays that of
bf16 weights, the yardstick the fp8 speed-up is measured against.
Prints one table and writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from pagedbatch.config import EngineConfig  # noqa: E402
from roofline import Shape, roofline_seconds  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402


def measure_ceilings(device: torch.device, sustain_s: float = 0.0) -> dict:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, CUDA events, median of repeats.

    The matmul rate is a burst's (10 matmuls of 1.4 ms). With ``sustain_s`` the same matmul also runs back to
    back for that many seconds, and the last quarter's rate is ``matmul_rate_sustained``: an H200 at full
    matmul load reaches its 700 W power cap within a second and lowers its clocks (1.98 to ~1.45 GHz seen in
    W1's decode), so a long FLOP-bound phase cannot run at the burst rate.
    """
    if device.type != "cuda":
        return {"copy_bw": 20e9, "matmul_rate": 0.5e12, "matmul_rate_sustained": None, "measured": False}
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return sorted(times)[len(times) // 2]

    copy_s = timed(lambda: y.copy_(x))
    mm_s = timed(lambda: a @ b)
    sustained = None
    if sustain_s > 0:
        reps = max(8, int(sustain_s / mm_s))
        tail = max(4, reps // 4)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(reps):
            if i == reps - tail:
                s.record()
            a @ b
        e.record()
        torch.cuda.synchronize()
        sustained = 2 * 8192**3 * tail / (s.elapsed_time(e) / 1e3)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy_bw": 2 * 2 * 2**30 / copy_s, "matmul_rate": 2 * 8192**3 / mm_s,
            "matmul_rate_sustained": sustained, "measured": True}


def model_dir_for(w: Workload, tmp: str) -> str:
    d = os.path.join(tmp, w.name)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "configs", "models", w.model_config), os.path.join(d, "config.json"))
    return d


def on_model(w: Workload, model_config: str) -> Workload:
    """The workload on another model shape: its prompts' ids folded into that vocabulary."""
    vocab = json.load(open(os.path.join(ROOT, "configs", "models", model_config)))["vocab_size"]
    prompts = [[t % vocab for t in p] for p in w.prompts]
    return Workload(w.name, model_config, prompts, w.max_tokens, w.temperature)


def _pdl_enabled(device) -> bool:
    from pagedbatch.engine import pdl

    return pdl.enabled(device)


def run_ours(w: Workload, model_dir: str, args) -> dict:
    from pagedbatch import InferenceEngine, SamplingParams

    t0 = time.perf_counter()
    eng = InferenceEngine(model_dir, load_format="dummy", skip_tokenizer_init=True, device=args.device,
                          dtype=args.dtype, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                          prefill_graph_max_tokens=args.prefill_graph_max_tokens,
                          attention_backend=args.attention_backend, scheduling_policy=args.policy,
                          decode_attention_config=args.decode_config,
                          prefill_attention_config=args.prefill_config,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          tensor_parallel_size=args.tensor_parallel_size, fused_sampler=not args.no_fused_sampler,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    load_s = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=m, temperature=w.temperature, ignore_eos=True) for m in w.max_tokens]
    # Warm-up on other random prompts (the workload's own would sit in the
    # prefix cache and flatter the timed run): compiles kernels, fills the allocator.
    rng = random.Random(12345)
    warm = [[rng.randrange(0, 10000) for _ in range(len(p))] for p in w.prompts[: args.max_num_seqs]]
    eng.generate(warm, SamplingParams(max_tokens=4, temperature=w.temperature, ignore_eos=True))
    eng.engine.scheduler.stats = type(eng.engine.scheduler.stats)()
    bm = eng.engine.block_manager
    bm.hit_tokens = bm.queried_tokens = bm.peak_used_blocks = 0
    walls = []
    # Later runs shift every id by r (within the workload's id range): the same shapes, nothing in the
    # prefix cache from the run before. The stats reported are the first run's.
    top = max(max(p) for p in w.prompts) + 1
    for r in range(args.repeat):
        prompts = w.prompts if r == 0 else [[(x + r) % top for x in p] for p in w.prompts]
        sync(args.device)
        t0 = time.perf_counter()
        outs = eng.generate(prompts, params)
        sync(args.device)
        walls.append(time.perf_counter() - t0)
        out_tokens = sum(o.output_tokens for o in outs)
        assert out_tokens == w.output_tokens, (out_tokens, w.output_tokens)
        if r == 0:
            stats = eng.engine.stats()
    wall = statistics.median(walls)
    res = {"engine": "pagedbatch", "wall_s": wall, "wall_s_runs": walls, "output_tokens": out_tokens,
           "prompt_tokens": w.prompt_tokens, "load_s": load_s, "stats": stats, "num_blocks": stats["num_blocks"],
           "host_prepare_ms_mean": getattr(eng.engine.runner, "prepare_ms_mean", None),
           "tensor_parallel_size": args.tensor_parallel_size}
    eng.shutdown()
    del eng
    free(args.device)
    return res


def run_hf_static(w: Workload, model_dir: str, args, batch: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    n = min(len(w.prompts), args.hf_max_prompts)
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if args.dtype != "float32" else torch.float32)
    model.eval()
    prompts, outs = w.prompts[:n], w.max_tokens[:n]
    pad = 0
    with torch.no_grad():  # warm-up (cuBLAS handles, allocator) outside the timed region
        model.generate(input_ids=torch.tensor([prompts[0]], device=args.device), max_new_tokens=2,
                       do_sample=False, pad_token_id=pad, eos_token_id=None)
    sync(args.device)
    t0 = time.perf_counter()
    produced = 0
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = prompts[i : i + batch]
            m = max(outs[i : i + batch])
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=args.device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=args.device)
            g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                               do_sample=False, pad_token_id=pad, eos_token_id=None)
            produced += sum(outs[i : i + batch])  # tokens the workload asked for (padding rows excluded)
            assert g.shape[1] == L + m
    sync(args.device)
    wall = time.perf_counter() - t0
    del model
    free(args.device)
    return {"engine": f"hf-static-b{batch}", "wall_s": wall, "output_tokens": produced, "prompts": n,
            "prompt_tokens": sum(map(len, prompts))}


def run_hf_generate_batch(w: Workload, model_dir: str, args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    n = min(len(w.prompts), args.hf_max_prompts)
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg._attn_implementation = "paged|sdpa"
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    m = max(w.max_tokens[:n])
    gc = GenerationConfig(max_new_tokens=m, min_new_tokens=m, do_sample=False, eos_token_id=None, pad_token_id=0,
                          num_blocks=4096, block_size=256, max_batch_tokens=8192)
    t0 = time.perf_counter()
    with torch.no_grad():
        res = model.generate_batch(inputs=w.prompts[:n], generation_config=gc)
    sync(args.device)
    wall = time.perf_counter() - t0
    produced = sum(len(r.generated_tokens) for r in res.values())
    del model
    free(args.device)
    return {"engine": "hf-generate_batch", "wall_s": wall, "output_tokens": produced, "prompts": n}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free(device):
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--prefill-graph-max-tokens", type=int, default=EngineConfig.prefill_graph_max_tokens,
                    help="steps with prefill of up to this many tokens replay CUDA graphs (0: none) [the "
                         "engine's default, %(default)s]")
    ap.add_argument("--sustained-s", type=float, default=3.0, metavar="S",
                    help="also measure the bf16 matmul rate over S seconds of back-to-back matmuls (the GPU at "
                         "its power cap) and report SOL%% against that roofline too (0: skip)")
    ap.add_argument("--peers", default="hf-static,hf-generate_batch",
                    help="comma list of hf-static, hf-static-best, hf-generate_batch, or none")
    ap.add_argument("--hf-max-prompts", type=int, default=128,
                    help="peer runs take minutes: run them on the first N prompts and compare rates")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's, 64 on a GPU)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--decode-config", default=None,
                    help="our Triton backend's decode kernel config (a DECODE_CONFIGS name; default: per cache dtype)")
    ap.add_argument("--prefill-config", default=None,
                    help="our Triton backend's prefill tile, 'bm<rows> bn<keys> w<warps> st<stages>' (default: "
                         "prefill_tile.DEFAULT_PREFILL_TILE)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                    help="our engine's KV cache (fp8: the roofline counts 1 byte per cached element)")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-fused-sampler", action="store_true",
                    help="sample with the torch ops, not the one-pass Triton kernel (A/B of the sampler)")
    ap.add_argument("--v-layout", choices=["keys-last", "key-contiguous"], default=None,
                    help="with --kv-cache-dtype fp8 and the Triton backend: how V blocks are stored "
                         "(kv_quant.FP8_V_KEY_CONTIGUOUS, this process only; default: the engine's)")
    ap.add_argument("--fuse-fp8-quant", action=argparse.BooleanOptionalAction, default=None,
                    help="with --quantization fp8: whether the norms and SiLU·mul quantize the activations of the "
                         "fp8 linears they feed (linear.FUSE_FP8_QUANT, on by default; this process only)")
    ap.add_argument("--fuse-fp8-quant-min-rows", type=int, default=None, metavar="M",
                    help="with --quantization fp8: fuse the quantization only into steps of at least M rows "
                         "(linear.FUSE_FP8_QUANT_MIN_ROWS; this process only)")
    ap.add_argument("--silu-quant-max-block", type=int, default=None, metavar="N",
                    help="with --quantization fp8: the fused SiLU·mul + quantize kernel keeps rows of up to N columns "
                         "in registers, longer ones in passes of N (fused_ops.SILU_QUANT_MAX_BLOCK; this process only)")
    ap.add_argument("--prefill-v-tile", type=int, default=None, metavar="N",
                    help="with an fp8 KV cache (key-contiguous V): steps with prefill write V by tiles of N "
                         "consecutive tokens (triton_backend.PREFILL_V_TILE, 0 = token by token; this process only)")
    ap.add_argument("--no-fuse-norm", action="store_true",
                    help="run each layer's RMSNorms as kernels of their own, not inside the skinny GEMM after them "
                         "(linear.FUSE_NORM off; this process only)")
    ap.add_argument("--fuse-norm-fp8", action="store_true",
                    help="also fuse the norms into the skinny GEMM in front of fp8 weights (linear.FUSE_NORM_FP8 on; "
                         "this process only)")
    ap.add_argument("--no-fuse-rope", action="store_true",
                    help="rotate q, k and write the KV cache in the attention backend's kernel, not in the qkv "
                         "skinny GEMM's epilogue (linear.FUSE_ROPE off; this process only)")
    ap.add_argument("--skinny-l2-prefetch", type=int, default=None, metavar="BYTES",
                    help="skinny_gemm.L2_PREFETCH_BYTES for this process (each skinny-GEMM program's L2 prefetch)")
    ap.add_argument("--skinny-fp8-max-m", type=int, default=None, metavar="M",
                    help="with --quantization fp8: fp8 matmuls of up to M rows run on the skinny GEMM, activations "
                         "kept in bf16 (skinny_gemm.MAX_M['fp8']; this process only)")
    ap.add_argument("--skinny-tuned", default=None, metavar="KEY=CONFIG[;...]",
                    help="replace skinny-GEMM tuning entries for this process, e.g. '1,37888,3584,fp8=fma bm1 bn16 "
                         "bk256 sk1 w4 st4' (skinny_gemm.override_tuned: KEY is M bucket,N,K,bf16|fp8[,silu_mul])")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch our kernels without programmatic dependent launch (A/B of engine/pdl.py; this "
                         "process only: tensor-parallel workers keep it on)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="split our engine over N GPUs (cuda:0..N-1)")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="our engine's weights in fp8 (e4m3)")
    ap.add_argument("--model-config", default=None,
                    help="a file under configs/models/ to run the workload on instead of its own model shape")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="time our engine's run N times (one load, one warm-up) and report the median, with each "
                         "run's rate: runs of the same code vary by a few percent on the GPU, W-nano with fp8 "
                         "weights by up to 10%% (docs/benchmarks.md, tenth session)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.no_pdl:
        from pagedbatch.engine import pdl

        pdl.USE_PDL = False
    from pagedbatch.engine.attention import kv_quant
    from pagedbatch.engine.models import linear as linear_mod

    if args.fuse_fp8_quant is not None:
        linear_mod.FUSE_FP8_QUANT = args.fuse_fp8_quant
    if args.fuse_fp8_quant_min_rows is not None:
        linear_mod.FUSE_FP8_QUANT_MIN_ROWS = args.fuse_fp8_quant_min_rows
    from pagedbatch.engine.models import fused_ops as fused_ops_mod
    if args.silu_quant_max_block is not None:
        fused_ops_mod.SILU_QUANT_MAX_BLOCK = args.silu_quant_max_block
    from pagedbatch.engine.attention import triton_backend as triton_backend_mod
    if args.prefill_v_tile is not None:
        triton_backend_mod.PREFILL_V_TILE = args.prefill_v_tile
    if args.no_fuse_norm:
        linear_mod.FUSE_NORM = False
    if args.fuse_norm_fp8:
        linear_mod.FUSE_NORM_FP8 = True
    if args.no_fuse_rope:
        linear_mod.FUSE_ROPE = False
    from pagedbatch.engine.models import skinny_gemm as skinny_mod
    if args.skinny_l2_prefetch is not None:
        skinny_mod.L2_PREFETCH_BYTES = args.skinny_l2_prefetch
    if args.skinny_fp8_max_m is not None:
        skinny_mod.MAX_M["fp8"] = args.skinny_fp8_max_m
    if args.skinny_tuned:
        try:
            skinny_mod.override_tuned(args.skinny_tuned)
        except ValueError as e:
            ap.error(f"--skinny-tuned: {e}")

    if args.v_layout is not None:
        kv_quant.FP8_V_KEY_CONTIGUOUS = args.v_layout == "key-contiguous"

    w = WORKLOADS[args.workload]()
    if args.model_config:
        w = on_model(w, args.model_config)
    device = torch.device(args.device)
    ceilings = measure_ceilings(device, args.sustained_s)
    cfg = json.load(open(os.path.join(ROOT, "configs", "models", w.model_config)))
    tp = args.tensor_parallel_size

    def roofline(rate):
        return roofline_seconds(Shape.from_hf(cfg), list(map(len, w.prompts)), w.max_tokens, ceilings["copy_bw"],
                                rate, num_gpus=tp, kv_dtype_bytes=1 if args.kv_cache_dtype != "auto" else None)

    roof = roofline(ceilings["matmul_rate"])
    # The same roofline at the sustained (power-capped) matmul rate: what a long FLOP-bound run can reach.
    roof_sus = roofline(ceilings["matmul_rate_sustained"]) if ceilings.get("matmul_rate_sustained") else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(w, tmp)
        rows.append(run_ours(w, model_dir, args))
        peers = [] if args.peers == "none" else args.peers.split(",")
        for p in peers:
            try:
                if p == "hf-static":
                    rows.append(run_hf_static(w, model_dir, args, args.hf_batch))
                elif p == "hf-static-best":
                    rows.append(run_hf_static(w, model_dir, args, 512))
                elif p == "hf-generate_batch":
                    rows.append(run_hf_generate_batch(w, model_dir, args))
                else:
                    raise SystemExit(f"unknown peer {p!r}")
            except Exception as e:  # a peer failing must not hide our numbers
                rows.append({"engine": p, "error": f"{type(e).__name__}: {e}"})
                free(args.device)

    ours = rows[0]
    ours_tps = ours["output_tokens"] / ours["wall_s"]
    roof_tps = w.output_tokens / roof["total_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpus = f" x {tp} (tensor parallel; roofline of {tp} GPUs)" if tp > 1 else ""
    quant = f", our weights {args.quantization} (roofline of bf16 weights)" if args.quantization else ""
    sus = sus_roof = ""
    if roof_sus is not None:
        sus = f" ({ceilings['matmul_rate_sustained'] / 1e12:.0f} sustained)"
        sus_roof = f", {roof_sus['total_s']:.2f} s at the sustained rate (SOL@sus%)"
    print(f"\n{w.name} on {w.model_config}: {len(w.prompts)} prompts, {w.prompt_tokens} prompt / {w.output_tokens} "
          f"output tokens, {device_name}{gpus}{quant}, copy {ceilings['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['matmul_rate'] / 1e12:.0f} "
          f"TFLOP/s{sus}; roofline {roof['total_s']:.2f} s (prefill {roof['prefill_s']:.2f} + decode "
          f"{roof['decode_s']:.2f}){sus_roof}")
    prefill_only = max(w.max_tokens) == 1  # then the roofline is the matmul rate: SOL% = share of it reached
    print(f"{'engine':<22}{'prompts':>8}{'out tok/s':>12}{'total tok/s':>13}{'wall s':>10}{'ours/peer':>11}{'SOL%':>7}"
          + (f"{'SOL@sus%':>10}" if roof_sus else "") + (f"{'TFLOP/s':>9}" if prefill_only else ""))
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<22} failed: {r['error']}")
            continue
        tps = r["output_tokens"] / r["wall_s"]
        tot = (r["output_tokens"] + r.get("prompt_tokens", 0)) / r["wall_s"]
        r["output_tok_s"], r["total_tok_s"] = tps, tot
        r["sol_pct"] = 100 * tps / roof_tps
        ratio = ours_tps / tps
        r["ours_over_this"] = ratio
        extra = ""
        if roof_sus is not None:
            r["sol_pct_sustained"] = 100 * tps * roof_sus["total_s"] / w.output_tokens
            extra += f"{r['sol_pct_sustained']:>9.1f}%"
        if prefill_only:
            share = r.get("prompt_tokens", w.prompt_tokens) / w.prompt_tokens  # a peer may run fewer prompts
            r["prefill_tflop_s"] = roof["prefill_tflop"] * share / r["wall_s"]
            extra += f"{r['prefill_tflop_s']:>9.0f}"
        print(f"{r['engine']:<22}{r.get('prompts', len(w.prompts)):>8}{tps:>12.0f}{tot:>13.0f}{r['wall_s']:>10.2f}"
              f"{ratio:>10.1f}x{r['sol_pct']:>6.1f}%{extra}")
    if len(ours.get("wall_s_runs", [])) > 1:
        runs = [w.output_tokens / t for t in ours["wall_s_runs"]]
        print(f"pagedbatch: the median of {len(runs)} runs above; each run's out tok/s: "
              + ", ".join(f"{v:,.0f}" for v in runs) + f" (SOL% {100 * min(runs) / roof_tps:.1f}-"
              f"{100 * max(runs) / roof_tps:.1f})")
    result = {
        "workload": w.name, "model_config": w.model_config, "tensor_parallel_size": tp,
        "quantization": args.quantization,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_name, "torch": torch.__version__, "ceilings": ceilings, "roofline": roof,
        "roofline_sustained": roof_sus,
        "roofline_output_tok_s": roof_tps, "rows": rows, "args": vars(args),
        "pdl": _pdl_enabled(device),
        "fuse_fp8_quant": linear_mod.FUSE_FP8_QUANT if args.quantization else None,
        "fuse_fp8_quant_min_rows": linear_mod.FUSE_FP8_QUANT_MIN_ROWS if args.quantization else None,
        "silu_quant_max_block": fused_ops_mod.SILU_QUANT_MAX_BLOCK if args.quantization else None,
        "skinny_l2_prefetch": skinny_mod.L2_PREFETCH_BYTES,
        "skinny_fp8_max_m": skinny_mod.MAX_M["fp8"] if args.quantization else None,
        "skinny_tuned_overrides": args.skinny_tuned,
        "fuse_norm": linear_mod.fuses_norm(args.quantization == "fp8"),
        "fuse_rope": linear_mod.FUSE_ROPE,
        "fp8_v_key_contiguous": kv_quant.FP8_V_KEY_CONTIGUOUS if args.kv_cache_dtype != "auto" else None,
        "prefill_v_tile": triton_backend_mod.PREFILL_V_TILE if args.kv_cache_dtype != "auto" else None,
    }
    try:
        import transformers, triton  # noqa: E401

        result["transformers"], result["triton"] = transformers.__version__, triton.__version__
    except ImportError:
        pass
    os.makedirs(args.results_dir, exist_ok=True)
    stem = (f"{w.name}-{datetime.date.today().isoformat()}-{device_name.replace(' ', '_')}"
            f"{f'-x{tp}' if tp > 1 else ''}{f'-{args.quantization}' if args.quantization else ''}"
            f"{'-kv8' if args.kv_cache_dtype != 'auto' else ''}{args.tag}")
    name, k = f"{stem}.json", 1
    while os.path.exists(os.path.join(args.results_dir, name)):  # a run never overwrites another's record
        k += 1
        name = f"{stem}-{k}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.results_dir, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
