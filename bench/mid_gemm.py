"""The fp8 x fp8 GEMM for mid-sized batches (models/mid_gemm.py) against torch._scaled_mm and cuBLAS bf16, one GPU.

    python bench/mid_gemm.py                                        # Qwen3-0.6B, M 32,64,128,256 (~1-2 min, H200)
    python bench/mid_gemm.py --model-config qwen2.5-7b.json --ms 32,64
    python bench/mid_gemm.py --device cpu                           # correctness only: interpreter, tiny shapes

Per decode matmul of the model (qkv with its bias, o, gate_up, down; the LM
head stays bf16 in the engine) and M, every candidate tile config is checked
against a float64 reference of the same e4m3 operands (NaN-filled output: a
wrong or unwritten result is reported, never timed; its error is recorded
next to _scaled_mm's),
then timed as a CUDA graph over R weight copies (R * bytes >= 4x L2, so each
call reads its weight from HBM, as one decode step does), median of --reps
replays. On the same operands: torch._scaled_mm (the engine's route above
the skinny GEMM's rows), F.linear in bf16 (cuBLAS), and the per-token
quantization kernel both fp8 GEMMs need in front of them. Then the chain of
all layers' four matmuls as the engine runs them (quantization kernels
included) for bf16, quantization + _scaled_mm, and quantization + ours
where ours won. Prints per-shape tables and the TUNED entries (ours faster
than _scaled_mm by more than --margin, quantization included in both) to
paste into pagedbatch/engine/models/mid_gemm.py. JSON under bench/results/.

Above 512 rows (the steps with prefill that run eagerly, outside CUDA
graphs: --ms 1024,8192) the candidates are 128-row tiles, each product is
also launched eagerly to time its host cost (``host_us``: torch._scaled_mm
spends ~100 us of host a call under the profiler, a Triton launch ~10-20),
and the chain is run eagerly, as such a step runs it (wall time of
launches and GPU), once more with our fastest tile at every shape. There a config is pasted when its GPU time is no worse
than _scaled_mm's and its launch cheaper: W-nano's 8,192-token steps with
fp8 weights are host-bound (tenth session), and a 7B's are not, where the
GPU time rule keeps _scaled_mm unless ours is as fast.

A second kind was tried and dropped on 2026-12-04: bf16 rows times fp8
weights on the fp16 MMA (no quantization kernel, like the skinny GEMM's
dotH) lost to fp8 x fp8 at every shape but one (Qwen3-0.6B's qkv at 32
rows, within 1%), by up to 3x at 128-256 rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

FP8 = torch.float8_e4m3fn

# (block_m, block_n, block_k, warps, stages). 64-row tiles are one Hopper warpgroup MMA; 32-row ones
# use the older mma.sync and fit the smallest bucket; narrow column tiles make more programs for N =
# 1,024 (0.6B's o and down: 32 tiles of 32). 128-row and 256-column tiles never won a shape of Qwen3-0.6B
# or Qwen2.5-7B at 32-256 rows (H200 sweeps of 2026-12-04), so they are no longer tried.
TILES = [(bm, bn, bk, 4, st) for bm in (32, 64) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
# Prefill-sized products (M > LARGE_M): compute-bound, so the larger tiles of a Hopper fp8 GEMM. Compiled
# offline for sm_90 with Triton 3.6 (bench/kernel_sass.py --kernel mid, 2026-12-04): 256-column tiles spill
# (112-224 B of stack, local loads in the K loop: the float32 accumulator plus the MMA's own partial sums, as
# max_num_imprecise_acc adds them every 128 products); the 13 here do not (153-253 registers, no stack), all on QGMMA.
LARGE_M = 512
TILES_LARGE = ([(128, 128, bk, w, st) for bk in (64, 128) for w in (4, 8) for st in (3, 4)]
               + [(bm, bn, 128, 4, st) for bm, bn in ((128, 64), (64, 128)) for st in (3, 4)]
               + [(256, 128, 64, 8, 3)])


def candidates(M: int):
    from pagedbatch.engine.models.mid_gemm import MidConfig

    out = []
    for bm, bn, bk, w, st in TILES if M <= LARGE_M else TILES_LARGE:
        if M <= LARGE_M and (bm > max(32, 2 * M) or (bm == 32 and M > 64)):
            continue  # tiles mostly of padding rows, or too many row tiles re-reading W
        if st * bk * (bm + bn) > 180 * 1024:
            continue  # shared memory of the pipeline stages (Triton asked 245,760 B for 4 x 256 x (64 + 128))
        out.append(MidConfig(bm, bn, bk, 8, w, st))
    return out


def _compile_one(spec):
    cfg_text, K, has_bias = spec
    try:
        from pagedbatch.engine.models import mid_gemm as mg

        dev = torch.device("cuda")
        x = torch.randn(64, K, device=dev).to(FP8)
        w, ws = torch.randn(256, K, device=dev).to(FP8), torch.ones(256, device=dev)
        b = torch.zeros(256, device=dev, dtype=torch.bfloat16) if has_bias else None
        mg.mid_linear(x, torch.ones(64, device=dev), w, ws, b, config=mg.MidConfig.parse(cfg_text))
        torch.cuda.synchronize()
        return spec, None
    except Exception as e:
        return spec, f"{type(e).__name__}: {str(e)[:300]}"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (the output's rounding included: bf16's is up to 2**-9 of each value)."""
    ref = ref.to(y.device)
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def host_us(fn, n: int = 50) -> float:
    """Host microseconds per eager call of ``fn`` (launch only: the GPU is waited for after the clock stops)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * dt / n


def eager_ms(fn, reps: int) -> float:
    """Median ms of one eager run of ``fn`` until the GPU is done (launches and GPU time, as an eager step)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model-config", default="qwen3-0.6b.json", help="a file in configs/models/")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ms", default="32,64,128,256")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--margin", type=float, default=0.03, help="a choice must beat _scaled_mm by this fraction")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--budget-s", type=float, default=300, help="stop trying configs after this many seconds")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    from skinny_gemm import check, graph_ms, model_shapes, precompile, quantize_rows

    from pagedbatch.engine.models import mid_gemm as mg
    from pagedbatch.engine.models.fp8 import quantize_per_token

    dev = torch.device(args.device)
    ms = [int(m) for m in args.ms.split(",")]
    shapes, layers = model_shapes(args.model_config, args.tp)
    shapes = {k: v[:3] for k, v in shapes.items() if k in ("qkv", "o", "gate_up", "down")}
    if cpu:
        shapes = {k: (min(n, 128), min(kk, 256), b) for k, (n, kk, b) in shapes.items()}
        ms = [m for m in ms if m <= 64][:2] or [32]
    l2 = 0 if cpu else torch.cuda.get_device_properties(dev).L2_cache_size
    gen = torch.Generator(device=dev).manual_seed(0)
    if not cpu:
        specs = sorted({(str(c), kk, b) for m in ms for c in candidates(m) for (n, kk, b) in shapes.values()})
        precompile(specs, args.jobs, worker=_compile_one)

    t_start = time.time()
    info = {"torch": torch.__version__, "device": "cpu" if cpu else torch.cuda.get_device_name(dev),
            "model_config": args.model_config, "tp": args.tp, "layers": layers}
    rows, choice, data = [], {}, {}
    for name, (N, K, has_bias) in shapes.items():
        r = 1 if cpu else max(2, min(128, -(-4 * l2 // (N * K))))
        copies = [quantize_rows(torch.randn(N, K, device=dev, generator=gen) * 0.02) for _ in range(r)]
        bf16 = [(w.float() * s[:, None]).to(torch.bfloat16) for w, s in copies[: 1 if cpu else max(2, r // 2)]]
        bias = torch.randn(N, device=dev, generator=gen).to(torch.bfloat16) if has_bias else None
        x = (torch.randn(max(ms), K, device=dev, generator=gen) * 3).to(torch.bfloat16)
        data[name] = (N, K, copies, bf16, bias, x)
        w0, s0 = copies[0]
        w64 = w0.double() * s0.double()[:, None]
        for M in ms:
            xm = x[:M].contiguous()
            xq, xs = quantize_rows(xm)
            xs = xs[:, None].contiguous()
            ref = (xq.double() * xs.double()) @ w64.T
            if bias is not None:
                ref += bias.double()
            row = {"shape": name, "N": N, "K": K, "M": M, "configs": {}}
            large = M > LARGE_M
            # Prefill-sized outputs dwarf the weights: two copies are enough there (and keep the graphs small).
            cm = copies[:2] if large else copies
            if not cpu:
                def sm():
                    for w, s in cm:
                        torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.view(1, -1), bias=bias,
                                         out_dtype=torch.bfloat16)
                row["scaled_mm_us"] = 1e3 * graph_ms(sm, args.reps) / len(cm)
                y = torch._scaled_mm(xq, w0.t(), scale_a=xs, scale_b=s0.view(1, -1), bias=bias, out_dtype=torch.bfloat16)
                row["scaled_mm_err"] = rel_err(y, ref)
                if large:
                    row["scaled_mm_host_us"] = host_us(lambda: torch._scaled_mm(
                        xq, w0.t(), scale_a=xs, scale_b=s0.view(1, -1), bias=bias, out_dtype=torch.bfloat16))

                bm = bf16[:2] if large else bf16

                def lin():
                    for w in bm:
                        F.linear(xm, w, bias)
                row["bf16_us"] = 1e3 * graph_ms(lin, args.reps) / len(bm)

                def quant():
                    for _ in range(16):
                        quantize_per_token(xm)
                row["quant_us"] = 1e3 * graph_ms(quant, args.reps) / 16
            for cfg in candidates(M):
                if time.time() - t_start > args.budget_s:
                    row["configs"][str(cfg)] = "skipped: --budget-s spent"
                    continue
                out = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)

                def ours(w, s, out=None, cfg=cfg):
                    return mg.mid_linear(xq, xs, w, s, bias, config=cfg, out=out)
                try:
                    ours(w0, s0, out)
                    err = check(out.double(), ref.to(out.device), tol=2 ** -7)
                    row.setdefault("errors", {})[str(cfg)] = rel_err(out, ref)
                except Exception as e:
                    err = f"{type(e).__name__}: {str(e)[:200]}"
                if err is not None:
                    row["configs"][str(cfg)] = f"wrong: {err}"
                    print(f"  {name} M={M} {cfg}: {err}", flush=True)
                    continue
                if cpu:
                    row["configs"][str(cfg)] = 0.0
                    continue

                def timed_fn(ours=ours):
                    for w, s in cm:
                        ours(w, s)
                row["configs"][str(cfg)] = 1e3 * graph_ms(timed_fn, args.reps) / len(cm)
            timed = {k: v for k, v in row["configs"].items() if isinstance(v, float)}
            if timed:
                row["best"] = min(timed, key=timed.get)
                row["best_us"] = timed[row["best"]]
            if not cpu and timed:
                # What the engine pays: both fp8 GEMMs need the quantization kernel in front.
                row["best_total_us"] = row["best_us"] + row["quant_us"]
                row["scaled_mm_total_us"] = row["scaled_mm_us"] + row["quant_us"]
                host = ""
                if large:
                    best_cfg = mg.MidConfig.parse(row["best"])
                    row["best_host_us"] = host_us(lambda: mg.mid_linear(xq, xs, w0, s0, bias, config=best_cfg))
                    host = f"; host {row['best_host_us']:.0f} us a launch, _scaled_mm {row['scaled_mm_host_us']:.0f}"
                    if row["best_us"] <= row["scaled_mm_us"] and row["best_host_us"] < row["scaled_mm_host_us"]:
                        choice[(M, name)] = row["best"]
                elif row["best_total_us"] < (1 - args.margin) * row["scaled_mm_total_us"]:
                    choice[(M, name)] = row["best"]
                print(f"{name:8s} N={N:6d} K={K:6d} M={M:4d}: bf16 {row['bf16_us']:6.1f}  quant {row['quant_us']:4.1f}  "
                      f"scaled_mm {row['scaled_mm_us']:6.1f}  ours {row['best_us']:6.1f} ({row['best']}): "
                      f"x{row['scaled_mm_total_us'] / row['best_total_us']:.2f} with the quantization; max error "
                      f"_scaled_mm {row['scaled_mm_err']:.1e}, ours {row['errors'][row['best']]:.1e}{host}", flush=True)
            elif cpu:
                print(f"{name} M={M}: {len(timed)} configs correct, "
                      f"{sum(1 for v in row['configs'].values() if isinstance(v, str))} not", flush=True)
            rows.append(row)

    def save(chains):
        """The paste lines and the JSON (written before the chains too, so a failed chain loses no sweep)."""
        paste = []
        for row in rows:
            if (row["M"], row["shape"]) in choice:
                paste.append(f"    ({mg.m_bucket(row['M'])}, {row['N']}, {row['K']}): '{row['best']}',  # "
                             f"{row['shape']}: {row['best_total_us']:.1f} us, _scaled_mm "
                             f"{row['scaled_mm_total_us']:.1f}, bf16 {row['bf16_us']:.1f}")
        if not cpu:
            os.makedirs(args.results_dir, exist_ok=True)
            stamp = datetime.date.today().isoformat()
            path = os.path.join(args.results_dir, f"mid_gemm-{stamp}-{info['device'].replace(' ', '_')}-"
                                f"{args.model_config.removesuffix('.json')}-tp{args.tp}"
                                f"{'-' + args.tag if args.tag else ''}.json")
            with open(path, "w") as f:
                json.dump({"info": info, "rows": rows, "chains": chains, "paste": paste}, f, indent=1)
            print(f"wrote {path}", flush=True)
        return paste

    save([])
    chains = []
    # Each shape's fastest config, pasted or not: above LARGE_M the eager chain shows what our launches save
    # against what our GPU time costs when every linear of a step takes it.
    best = {(r["M"], r["shape"]): r["best"] for r in rows if "best" in r}
    for M in ms if not cpu and (choice or any(m > LARGE_M for m in ms)) else []:
        xin = {name: d[5][:M].contiguous() for name, d in data.items()}

        def chain(kind, M=M):
            table = choice if kind == "ours" else best

            def fn():
                for li in range(layers):
                    for name, (N, K, copies, bf16, bias, x) in data.items():
                        if kind == "bf16":
                            F.linear(xin[name], bf16[li % len(bf16)], bias)
                            continue
                        w, s = copies[li % len(copies)]
                        xq, xs = quantize_per_token(xin[name])
                        if kind != "scaled_mm" and (M, name) in table:
                            mg.mid_linear(xq, xs, w, s, bias, config=mg.MidConfig.parse(table[(M, name)]))
                        else:
                            torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.view(1, -1), bias=bias,
                                             out_dtype=torch.bfloat16)
            # Prefill-sized steps run eagerly in the engine: their chain is timed that way (host included).
            return eager_ms(fn, args.reps) if M > LARGE_M else graph_ms(fn, args.reps)

        c = {"M": M, "eager": M > LARGE_M, "bf16_ms": chain("bf16"), "quant_scaled_mm_ms": chain("scaled_mm"),
             "quant_ours_ms": chain("ours")}
        extra = ""
        if M > LARGE_M:
            c["quant_ours_everywhere_ms"] = chain("ours_everywhere")
            extra = f", ours at every shape {c['quant_ours_everywhere_ms']:.3f}"
        chains.append(c)
        print(f"chain M={M}{' (eager)' if c['eager'] else ''}: bf16 {c['bf16_ms']:.3f} ms, quantization + _scaled_mm "
              f"{c['quant_scaled_mm_ms']:.3f}, quantization + ours where it won {c['quant_ours_ms']:.3f}{extra}",
              flush=True)

    paste = save(chains)
    print(f"\n# TUNED entries (faster than quantization + _scaled_mm by more than the margin; above {LARGE_M} rows "
          "no slower on the GPU and cheaper to launch):\n" + "\n".join(paste))
    return 0 if all("best" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
