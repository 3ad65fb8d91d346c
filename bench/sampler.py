"""The sampler alone: the torch ops against the fused one-pass Triton kernel (engine/sampling_kernels.py).

    python bench/sampler.py                      # B 1/64/256/512 x V 151,936, bf16 logits, T 0.6 (~30 s)
    python bench/sampler.py --logits peaked      # a few dominant tokens per row, like a real LM's logits
    python bench/sampler.py --sweep              # also time the kernel at other split counts / tile shapes
    python bench/sampler.py --device cpu --quick # smoke test through Triton's interpreter

For each batch size and kind of row (seeded, unseeded, greedy; temperature
rows are all sampled), times ``Sampler(fused=False)`` (today's torch path;
for an all-greedy batch that is one ``argmax``) and ``Sampler(fused=True)``:
device time between CUDA events around one call, queued behind a short GPU
sleep so that host launch gaps do not count (median of --reps), and the host
time to issue the call (what an idle GPU would wait for at batch 1). The
roofline is one read of the bf16 logits at the copy bandwidth measured in
the same run. "diff" counts rows whose tokens differ between the paths
(seeded and greedy rows should agree up to exact ties; unseeded rows draw
different random numbers by design). JSON goes to bench/results/.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device copy (median of 10)."""
    if device.type != "cuda":
        return 20e9
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = [gpu_ms(lambda: y.copy_(x), device)[0] for _ in range(10)]
    del x, y
    return 2 * 2**30 / (statistics.median(times) / 1e3)


def gpu_ms(fn, device: torch.device) -> tuple[float, float]:
    """(device ms, host us to issue) of one call. The GPU first sleeps ~1 ms so that the host has
    queued every kernel of ``fn`` before the start event: launch gaps are not counted."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, (time.perf_counter() - t0) * 1e6
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)
    s.record()
    t0 = time.perf_counter()
    fn()
    host_us = (time.perf_counter() - t0) * 1e6
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e), host_us


def measure(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(median device ms, median host us to issue) over ``reps`` calls after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [gpu_ms(fn, device) for _ in range(reps)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def make_logits(B: int, V: int, kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(B)
    x = torch.randn(B, V, device=device, generator=g) * 3.0
    if kind == "peaked":
        # Eight strong candidates per row among low ids, as frequent tokens sit early in BPE vocabularies.
        ids = torch.randint(0, min(V, 4096), (B, 8), device=device, generator=g)
        x.scatter_add_(1, ids, torch.full(ids.shape, 25.0, device=device))
    return x.to(dtype)


def batch_for(kind: str, B: int, V: int, temperature: float, device: torch.device):
    from pagedbatch.engine.sampler import SamplingBatch
    from pagedbatch.sampling_params import SamplingParams

    if kind == "greedy":
        params = [SamplingParams(temperature=0)] * B
    elif kind == "seeded":
        params = [SamplingParams(temperature=temperature, seed=1000 + i) for i in range(B)]
    else:
        params = [SamplingParams(temperature=temperature)] * B
    outputs = [[0] * (i % 64) for i in range(B)]
    return SamplingBatch.build(params, [[] for _ in range(B)], outputs, [[] for _ in range(B)], V, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,64,256,512")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--logits", choices=("randn", "peaked"), default="randn",
                    help="randn: no tile can be skipped (worst case for the kernel); peaked: most can")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel at other splits / tiles (seeded rows)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 reps (CPU smoke test)")
    ap.add_argument("--results-dir", default=None, help="default bench/results (none written with --quick)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below
    from pagedbatch.engine import sampling_kernels
    from pagedbatch.engine.sampler import Sampler

    batches = [int(b) for b in args.batches.split(",")]
    V, reps, dtype = args.vocab, args.reps, getattr(torch, args.dtype)
    if args.quick:
        batches, V, reps = [1, 4], 4096, 2
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    print(f"sampler: V {V}, {args.dtype} {args.logits} logits, T {args.temperature}, {name}, "
          f"copy {bw / 1e12:.2f} TB/s, median of {reps}")
    print(f"{'B':>5} {'rows':<9}{'torch us':>10}{'fused us':>10}{'speedup':>9}{'roof us':>9}{'fused/roof':>11}"
          f"{'host us t/f':>14}{'diff':>6}{'splits':>7}")
    rows = []
    for B in batches:
        x = make_logits(B, V, args.logits, device, dtype)
        roof_us = B * V * x.element_size() / bw * 1e6
        for kind in ("seeded", "unseeded", "greedy"):
            b = batch_for(kind, B, V, args.temperature, device)
            torch_s, fused_s = Sampler(seed=1, fused=False), Sampler(seed=1, fused=True)
            t_ms, t_host = measure(lambda: torch_s(x, b), device, reps)
            f_ms, f_host = measure(lambda: fused_s(x, b), device, reps)
            diff = int((torch_s(x, b).token_ids != fused_s(x, b).token_ids).sum())
            splits = sampling_kernels.default_splits(B, V, sms)
            r = {"batch": B, "rows": kind, "torch_us": t_ms * 1e3, "fused_us": f_ms * 1e3, "roofline_us": roof_us,
                 "torch_host_us": t_host, "fused_host_us": f_host, "rows_differing": diff, "splits": splits}
            rows.append(r)
            print(f"{B:>5} {kind:<9}{r['torch_us']:>10.1f}{r['fused_us']:>10.1f}{t_ms / f_ms:>8.1f}x{roof_us:>9.1f}"
                  f"{r['fused_us'] / roof_us:>10.1f}x{t_host:>7.0f}/{f_host:<6.0f}{diff:>6}{splits:>7}")
    sweep = []
    if args.sweep:
        print("\nkernel alone, seeded rows: us by (splits, block, warps); * = default_splits")
        for B in batches:
            x = make_logits(B, V, args.logits, device, dtype)
            b = batch_for("seeded", B, V, args.temperature, device)
            default = sampling_kernels.default_splits(B, V, sms)
            cands = sorted({1, 2, 4, 8, 16, 32, 75, default} if not args.quick else {1, 2})
            for block, warps in ((2048, 8), (4096, 8), (2048, 4), (1024, 4)):
                line = []
                for s in cands:
                    ms, _ = measure(lambda: sampling_kernels.fused_sample(
                        x, b.temperature, None, b.seed_slot, b.seeds, b.positions, None, s, block=block,
                        num_warps=warps), device, reps)
                    sweep.append({"batch": B, "splits": s, "block": block, "num_warps": warps, "us": ms * 1e3})
                    line.append(f"{s}{'*' if s == default else ''}:{ms * 1e3:.1f}")
                print(f"{B:>5} block {block:>4} warps {warps}: " + "  ".join(line))
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/sampler.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": name, "torch": torch.__version__, "copy_bw": bw, "vocab": V, "dtype": args.dtype,
        "logits": args.logits, "temperature": args.temperature, "reps": reps, "rows": rows, "sweep": sweep,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if args.quick and args.results_dir is None:
        print("quick run: no JSON written (give --results-dir to keep one)")
        return 0
    results_dir = args.results_dir or os.path.join(HERE, "results")
    os.makedirs(results_dir, exist_ok=True)
    out = os.path.join(results_dir, f"sampler-{datetime.date.today().isoformat()}-"
                                         f"{name.replace(' ', '_')}{'-quick' if args.quick else ''}{args.tag}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
