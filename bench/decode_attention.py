"""Paged decode attention alone: every DecodeConfig on the engine's decode shapes, one GPU.

    python bench/decode_attention.py                          # the sweep: 4 cases x bf16/fp8 (~2 min)
    python bench/decode_attention.py --cases wnano --dtypes bf16 --configs v1,v2,v2-lanes
    python bench/decode_attention.py --device cpu --quick     # correctness only, tiny shapes, interpreter

Cases (the engine's shapes; head_dim 128, 16-token blocks under a shuffled block table):
  wnano   Qwen3-0.6B, 16 q / 8 kv heads: batch 256, context 100-1,100     (W-nano's full batch)
  w1      Qwen2.5-7B, 28 q / 4 kv heads: batch 512, context 130-770       (W1's decode steps)
  single  Qwen2.5-7B: batch 1, context 128-400 (each timed call its own)  (single stream)
  long    Qwen2.5-7B: batch 32 x 8,192

The split count is the engine's: each config's policy with max_seq_len =
the model's max_position_embeddings, as the captured CUDA graphs have it.
Each (case, config) is first checked against the torch reference (float32
on the same cache) with a NaN-filled output and split workspace: a config
that is wrong is reported as wrong and not timed. Timing: a CUDA graph of R
calls, each over its own cache (a "layer"), R x bytes >= 4x L2, so every
call reads its KV from HBM as in the engine (the GEMMs between layers evict
L2); median of replays, divided by R. TB/s counts every K and V element of
every sequence once. Configs whose launch would be identical to an earlier
one on a case (e.g. the lanes knobs on a group of 7) are listed, not re-run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# What runs where, chosen to keep the sweep near a minute of compiles (each distinct launch compiles once):
# the bandwidth-bound big batches get v2's one-knob ablations (does each idea pay?) and the tile/warp/stage
# variants; batch 1 and the long contexts get the split policies, where splits decide; fp8 gets the tiles
# and warps that could move its optimum (half the bytes per tile). --configs all runs everything everywhere.
_ABLATIONS = ["v2-no-prefetch", "v2-late-v", "v2-stages1", "v2-stages3", "v2-stages3-lt", "v2-warps8"]
SWEEP = {
    ("wnano", "bf16"): ["v1", "v2", *_ABLATIONS, "v2-n128-w8", "v2-lanes", "v2-lanes32-w8", "v2-pps16"],
    ("w1", "bf16"): ["v1", "v2", *_ABLATIONS, "v2-n32", "v2-n128-w8", "v2-pps16"],
    ("single", "bf16"): ["v1", "v2", "v2-n32", "v2-stages3", "v2-stages3-lt", "v2-lt-waves", "v2-lt-splits8",
                         "v2-nosplit", "v2-splits4"],
    ("long", "bf16"): ["v1", "v2", "v2-n128-w8", "v2-stages3", "v2-stages3-lt", "v2-lt-waves", "v2-pps16",
                       "v2-nosplit", "v2-splits4"],
    # fp8: on the engine's key-contiguous V both conversions are Triton's cast (the -cast names launch the
    # same kernel); the masked last tile loaded whole, then tiles and stages (2026-12-04, third session).
    # With --v-layout keys-last the -cast names compare Triton's cast with the paired conversion.
    # Fourth session: the row sums deferred (-lt), and both products on fp8 MMAs (v2-f8mma-lt). Fifth: split
    # counts by waves (-waves, the defaults), 128-key fp8-MMA tiles.
    ("wnano", "fp8"): ["v2-stages3", "v2-stages3-lt", "v2-f8mma-lt", "v2-f8mma-lt-waves", "v2-f8mma-lt-n128-w8",
                       "v2-f8mma-s2-r80"],
    ("w1", "fp8"): ["v2-stages3", "v2-stages3-lt", "v2-f8mma-lt", "v2-f8mma-lt-waves", "v2-f8mma-lt-n128-w8",
                    "v2-f8mma-s2-r80"],
    ("single", "fp8"): ["v2-stages3-lt", "v2-f8mma-lt-waves", "v2-lt-splits8"],  # + the default, always
    ("long", "fp8"): ["v2-stages3-lt", "v2-lt-waves", "v2-f8mma-lt", "v2-f8mma-lt-pps3", "v2-f8mma-lt-waves"],
}
def engine_v_layout(fp8: bool) -> str:
    """How the engine's runner stores V under the Triton backend (kv_quant.key_contiguous_v)."""
    from pagedbatch.engine.attention import kv_quant

    return "key-contiguous" if fp8 and kv_quant.FP8_V_KEY_CONTIGUOUS else "keys-last"


L2_BYTES = 50 * 2**20  # H100/H200 L2 is 50 MB (60 MB on some H200 SKUs): 4x of it is cold enough


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    heads: int
    kv_heads: int
    batch: int
    ctx: tuple[int, int]  # context length range (inclusive), uniform
    max_model_len: int
    head_dim: int = 128
    block_size: int = 16
    per_call_lengths: bool = False  # each timed call draws its own length (batch 1 over a range of steps)


CASES = {
    "wnano": Case("wnano", 16, 8, 256, (100, 1100), 40960),
    "w1": Case("w1", 28, 4, 512, (130, 770), 32768),
    "single": Case("single", 28, 4, 1, (128, 400), 32768, per_call_lengths=True),
    "long": Case("long", 28, 4, 32, (8192, 8192), 32768),
}
QUICK_CASES = {  # interpreter sizes: the same group sizes, splits and partial tiles
    "wnano": Case("wnano", 4, 2, 3, (1, 70), 4096, head_dim=32),
    "w1": Case("w1", 7, 1, 3, (15, 90), 4096, head_dim=32),
    "single": Case("single", 7, 1, 1, (20, 60), 4096, head_dim=32, per_call_lengths=True),
    "long": Case("long", 7, 1, 2, (300, 300), 4096, head_dim=32),
}


def build_case(case: Case, fp8: bool, layers: int, device, seed: int = 0, v_layout: str = "keys-last",
               k_layout: str = "slot-major"):
    """``layers`` caches of the case's shape under one shuffled block table, queries, per-call lengths.
    ``v_layout`` "key-contiguous": V stored [layers, blocks, kv_heads, head_dim, block_size] and passed as the
    permuted view of the logical [.., blocks, block_size, kv_heads, head_dim] (same values)."""
    import torch

    from pagedbatch.engine.attention.kv_quant import quantize

    g = torch.Generator(device="cpu").manual_seed(seed)
    lo, hi = case.ctx
    n_calls = layers if case.per_call_lengths else 1
    lens = torch.randint(lo, hi + 1, (n_calls, case.batch), generator=g) + 1  # + this step's token
    width = -(-int(lens.max()) // case.block_size)
    num_blocks = case.batch * width + 1
    table = (1 + torch.randperm(num_blocks - 1, generator=g)).view(case.batch, width).to(torch.int32)
    shape = (layers, num_blocks, case.block_size, case.kv_heads, case.head_dim)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    kv_scale = torch.tensor([0.03, 0.2], device=device) if fp8 else None
    caches = []
    for i, scale in enumerate((0.03, 0.2)):
        x = torch.randn(shape, device=device, dtype=dt, generator=torch.Generator(device).manual_seed(seed + i))
        c = quantize(x, torch.tensor(scale, device=device)) if fp8 else x
        del x
        if i == 0 and k_layout == "head-major":  # [.., blocks, kv_heads, block_size, head_dim] underneath
            c = c.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
        if i == 1 and v_layout == "key-contiguous":
            c = c.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        caches.append(c)
    q = torch.randn(case.batch, case.heads, case.head_dim, device=device, dtype=dt,
                    generator=torch.Generator(device).manual_seed(seed + 2))
    seq_lens = [lens[min(i, n_calls - 1)].to(device=device, dtype=torch.int32) for i in range(layers)]
    return dict(k=caches[0], v=caches[1], q=q, table=table.to(device), seq_lens=seq_lens, kv_scale=kv_scale,
                kv_bytes=int(lens.sum()) // n_calls * case.kv_heads * case.head_dim * 2 * (1 if fp8 else dt.itemsize))


def reference(case: Case, data, layer: int):
    import torch

    from pagedbatch.engine.attention.metadata import AttentionMetadata
    from pagedbatch.engine.attention.torch_ref import paged_attention_reference

    lens = data["seq_lens"][layer]
    b = case.batch
    meta = AttentionMetadata(positions=(lens - 1).long(), slot_mapping=lens.long(),
                             query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=lens.device),
                             seq_lens=lens, block_tables=data["table"], num_seqs=b, num_tokens=b, max_query_len=1,
                             max_seq_len=int(lens.max()))
    return paged_attention_reference(data["q"].float(), data["k"][layer].contiguous(), data["v"][layer].contiguous(), meta,
                                     case.head_dim**-0.5, data["kv_scale"])


def occupancy(kernel, num_warps: int) -> dict:
    """Registers, spills, shared memory and the resident programs per SM they allow (Hopper limits)."""
    try:
        if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
            kernel._init_handles()
        regs, spills, smem = kernel.n_regs, kernel.n_spills, kernel.metadata.shared
    except Exception:  # the interpreter, or a triton without these fields
        return {}
    return {"regs": regs, "spills": spills, "smem_kb": smem / 1024,
            "programs_per_sm": programs_per_sm(regs, smem, num_warps)[0]}


def programs_per_sm(regs: int, smem: int, num_warps: int) -> tuple[int, int, int]:
    """(programs, by registers, by shared memory) of one kernel that fit on an sm_90 SM: 64K registers
    allocated per warp in units of 256, 227 KB of shared memory plus 1 KB reserved per block, at most 32 blocks
    and 64 warps. ``smem`` in bytes."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, per_warp * num_warps)
    by_smem = (228 * 1024) // (smem + 1024) if smem else 32
    return min(by_regs, by_smem, 64 // num_warps, 32), by_regs, by_smem


def launch_key(cfg, case: Case, splits: int, q_dtype, fp8: bool, paired_fp8_cvt: bool,
               v_key_contiguous: bool = False, fp8_mma_runs: bool = False) -> tuple:
    """Everything that makes two configs' launches differ on one case: v2's constexprs as the launcher
    derives them (``triton_decode.v2_constexprs``), the launch knobs and the split count."""
    from pagedbatch.engine.attention.triton_decode import v2_constexprs

    if cfg.kernel == "v1":
        return ("v1", cfg.block_n, cfg.num_warps, cfg.num_stages, splits)
    const = v2_constexprs(cfg, case.heads // case.kv_heads, case.head_dim, case.block_size, splits, q_dtype, fp8,
                          paired_fp8_cvt, v_key_contiguous=v_key_contiguous, fp8_mma_runs=fp8_mma_runs)
    return ("v2", tuple(sorted(const.items())), cfg.num_warps, cfg.num_stages, cfg.max_registers, splits)


def graph_layers(case: Case, fp8: bool, quick: bool) -> int:
    """Calls (each over its own cache) per timed graph: enough that their KV is >= 4x L2 (1 when quick)."""
    mean_len = (case.ctx[0] + case.ctx[1]) // 2 + 1
    bytes_per_call = case.batch * mean_len * case.kv_heads * case.head_dim * 2 * (1 if fp8 else 2)
    return 1 if quick else max(2, min(256, -(-4 * L2_BYTES // bytes_per_call)))


def run_case(case: Case, fp8: bool, names, device, num_sms: int, quick: bool, reps: int,
             v_layout: str = "keys-last", k_layout: str = "slot-major") -> list[dict]:
    import torch

    from pagedbatch.engine.attention.triton_decode import DECODE_CONFIGS, _launch, decode_workspace_shape, v_key_run
    from pagedbatch.engine.attention.triton_kernels import fp8_mma_runs, fp8_tile_convert

    group = case.heads // case.kv_heads
    layers = graph_layers(case, fp8, quick)
    data = build_case(case, fp8, layers, device, v_layout=v_layout, k_layout=k_layout)
    refs = {}
    rows, seen = [], {}
    for name in names:
        cfg = DECODE_CONFIGS[name]
        splits = cfg.num_splits(case.batch, case.kv_heads, group, case.max_model_len, num_sms)
        key = launch_key(cfg, case, splits, data["q"].dtype, fp8, fp8 and fp8_tile_convert(torch.device(device)),
                         v_key_run(data["v"][0], cfg.tile(group)) > 0, fp8 and fp8_mma_runs(torch.device(device)))
        row = {"config": name, "splits": splits, "tile": cfg.tile(group),
               "path": "v1" if cfg.kernel == "v1" else ("dot" if cfg.uses_dot(group) else "lanes")}
        rows.append(row)
        if key in seen:
            row["same_as"] = seen[key]
            continue
        seen[key] = name
        so, sl = decode_workspace_shape(case.batch, case.heads, splits, case.head_dim)
        outs = [torch.empty_like(data["q"]) for _ in range(layers)]
        ws = (torch.empty(so, dtype=torch.float32, device=device), torch.empty(sl, dtype=torch.float32, device=device))

        def call(i, out):
            return _launch(data["q"], data["k"][i], data["v"][i], data["table"], data["seq_lens"][i],
                           case.head_dim**-0.5, splits, out, ws if splits > 1 else None, cfg, data["kv_scale"])[1]

        # Correctness first: NaN-filled output and workspace, each call checked on two layers.
        err = 0.0
        try:
            for i in sorted({0, layers - 1}):
                if i not in refs:
                    refs[i] = reference(case, data, i)
                outs[i].fill_(float("nan"))
                ws[0].fill_(float("nan"))
                ws[1].fill_(float("nan"))
                kernel = call(i, outs[i])
                got = outs[i].float()
                if not torch.isfinite(got).all():
                    raise AssertionError("non-finite output: an element was not written or poison was read")
                err = max(err, (got - refs[i]).abs().max().item())
        except Exception as e:  # a config that fails to compile or run is reported, not fatal
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
            continue
        tol = 1e-4 if quick else 2e-2
        row["max_err"] = err
        if err > tol:
            row["status"] = "wrong"
            continue
        row["status"] = "ok"
        row.update(occupancy(kernel, cfg.num_warps))
        if quick:
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(layers):
                call(i, outs[i])
        # Warm up for a fixed time, not a fixed count: the first config of a case ran ~5% slower than the same
        # launch timed later in the case (H200, 2026-12-04, seventh session) after one warm replay.
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            graph.replay()
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / layers)
        del graph
        row["us"] = statistics.median(times)
        row["tb_s"] = data["kv_bytes"] / (row["us"] * 1e-6) / 1e12
    info = {"case": case.name, "dtype": "fp8" if fp8 else "bf16", "batch": case.batch, "heads": case.heads,
            "kv_heads": case.kv_heads, "head_dim": case.head_dim, "block_size": case.block_size, "ctx": case.ctx,
            "layers_per_graph": layers, "kv_bytes_per_call": data["kv_bytes"], "v_layout": v_layout, "k_layout": k_layout}
    for row in rows:
        row.update(info)
    return rows


def measure_ceilings(device) -> dict:
    import torch

    x = torch.empty(2**30, dtype=torch.bfloat16, device=device)  # 2 GiB
    y = torch.empty_like(x)

    def timed(fn):
        fn()
        ts = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    copy = 2 * x.numel() * 2 / timed(lambda: y.copy_(x))
    read = x.numel() * 2 / timed(lambda: x.sum(dtype=torch.float32))
    del x, y
    torch.cuda.empty_cache()
    return {"copy_tb_s": copy / 1e12, "read_tb_s": read / 1e12}


def print_table(rows, ceilings) -> None:
    copy = ceilings.get("copy_tb_s")
    head = rows[0]
    print(f"\n{head['case']} {head['dtype']}: {head['heads']} q / {head['kv_heads']} kv heads, head_dim "
          f"{head['head_dim']}, batch {head['batch']}, context {head['ctx'][0]}-{head['ctx'][1]}, block "
          f"{head['block_size']}; {head['kv_bytes_per_call'] / 1e6:.1f} MB of KV per call, "
          f"{head['layers_per_graph']} calls per graph; V {head.get('v_layout', 'keys-last')}, K {head.get('k_layout', 'slot-major')}")
    print(f"  {'config':<16}{'path':>6}{'tile':>5}{'splits':>7}{'us/call':>9}{'TB/s':>7}{'%copy':>7}"
          f"{'regs':>6}{'spill':>6}{'smemKB':>7}{'prog/SM':>8}{'max err':>9}")
    for r in rows:
        lead = f"  {r['config']:<16}{r['path']:>6}{r['tile']:>5}{r['splits']:>7}"
        if "same_as" in r:
            print(f"{lead}   (same launch as {r['same_as']})")
            continue
        if r["status"] != "ok":
            why = r.get("error") or f"max err {r.get('max_err', 0.0):.2e}"
            print(f"{lead}   {r['status'].upper()}: {why}")
            continue
        timing = (f"{r['us']:>9.1f}{r['tb_s']:>7.2f}{100 * r['tb_s'] / copy:>6.0f}%" if "us" in r
                  else f"{'-':>9}{'-':>7}{'-':>7}")
        occ = (f"{r['regs']:>6}{r['spills']:>6}{r['smem_kb']:>7.1f}{r['programs_per_sm']:>8}" if "regs" in r
               else f"{'':>27}")
        print(f"{lead}{timing}{occ}{r['max_err']:>9.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, correctness only (the CPU interpreter)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--configs", default="sweep",
                    help="comma list of DECODE_CONFIGS names, 'sweep' (SWEEP: per case) or 'all'")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--v-layout", choices=["keys-last", "key-contiguous"], default=None,
                    help="the V cache stored like K, or with each block's keys contiguous (a permuted view; "
                         "bench/fp8_v_layout_study.py says why); default: as the engine stores it "
                         "(key-contiguous for an fp8 cache while kv_quant.FP8_V_KEY_CONTIGUOUS, else like K)")
    ap.add_argument("--k-layout", choices=["slot-major", "head-major"], default="slot-major",
                    help="the K cache as the engine stores it ([block, slot, kv_head, d]) or with each block's kv "
                         "heads outermost ([block, kv_head, slot, d], a permuted view): one head's keys of a block "
                         "adjacent in memory")
    ap.add_argument("--block-size", type=int, default=None,
                    help="the KV cache's block size for every case (the engine's --block-size; default: the "
                         "case's, 16)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.block_size is not None and (args.block_size < 1 or args.block_size & (args.block_size - 1)):
        ap.error(f"--block-size must be a power of two, got {args.block_size}")
    if args.device == "cpu":
        if not args.quick:
            ap.error("--device cpu runs the interpreter: only --quick (correctness at tiny sizes) makes sense")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch
    import triton

    from pagedbatch.engine.attention.triton_decode import DECODE_CONFIGS, DEFAULT_DECODE_CONFIG

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --device cpu --quick for the correctness part")
    names = list(DECODE_CONFIGS) if args.configs in ("all", "sweep") else args.configs.split(",")
    unknown = [n for n in names if n not in DECODE_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(DECODE_CONFIGS)}")
    cases = QUICK_CASES if args.quick else CASES
    if args.block_size is not None:
        cases = {k: dataclasses.replace(c, block_size=args.block_size) for k, c in cases.items()}
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device) if device.type == "cuda" and not args.quick else {}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}"
          + (f"; copy {ceilings['copy_tb_s']:.2f} TB/s, read {ceilings['read_tb_s']:.2f} TB/s (this run)"
             if ceilings else ""))
    all_rows, best = [], {}
    for case_name in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            fp8 = dtype == "fp8"
            run_names = names
            if args.configs == "sweep":
                default = DEFAULT_DECODE_CONFIG[1 if fp8 else 2]
                run_names = SWEEP[case_name, dtype] + ([default] if default not in SWEEP[case_name, dtype] else [])
            rows = run_case(cases[case_name], fp8, run_names, device, num_sms, args.quick, args.reps,
                            engine_v_layout(fp8) if args.v_layout is None else args.v_layout, args.k_layout)
            all_rows += rows
            print_table(rows, ceilings)
            timed = [r for r in rows if "us" in r]
            if timed:
                b = min(timed, key=lambda r: r["us"])
                best[f"{case_name}-{dtype}"] = (b["config"], b["us"], b["tb_s"])
            bad = [r for r in rows if r.get("status") not in ("ok", None)]
            ok = sum(r.get("status") == "ok" for r in rows)
            print(f"[{case_name} {dtype}] {ok} configs correct, {len(bad)} wrong or failing"
                  + "".join(f"\n    {r['config']}: {r['status']} {r.get('error', r.get('max_err', ''))}"
                            for r in bad))
    elapsed = time.perf_counter() - t0
    if best:
        print("\nbest per case (us/call, TB/s), and the engine's default config on it:")
        for k, (name, us, tbs) in best.items():
            default = DEFAULT_DECODE_CONFIG[1 if k.endswith("fp8") else 2]
            mine = {r["config"]: r for r in all_rows if f"{r['case']}-{r['dtype']}" == k}
            d = mine.get(default, {})
            d_us = d.get("us", mine.get(d.get("same_as"), {}).get("us"))
            note = f"{default} {d_us:.1f} us ({us / d_us:.0%} of it)" if d_us else f"{default}: not timed"
            print(f"  {k:<14} {name:<16} {us:8.1f} {tbs:6.2f}   default {note}")
        print("To switch the engine's default: DEFAULT_DECODE_CONFIG in pagedbatch/engine/attention/triton_decode.py")
    print(f"sweep took {elapsed:.0f} s")
    wrong = [r for r in all_rows if r.get("status") not in ("ok", None)]
    if args.quick:
        return 1 if wrong else 0
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"decode-attention-{datetime.date.today().isoformat()}-"
                                          f"{device_name.replace(' ', '_')}{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": "python bench/decode_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                   "ceilings": ceilings, "default": DEFAULT_DECODE_CONFIG,
                   "configs": {n: dataclasses.asdict(DECODE_CONFIGS[n]) for n in names},
                   "best": best, "rows": all_rows, "elapsed_s": elapsed}, f, indent=1, default=str)
    print(f"wrote {path}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
