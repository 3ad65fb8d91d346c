"""Where a workload's time goes: host vs GPU per step, prefill vs decode steps, and the top GPU kernels.

    python bench/profile_steps.py --workload W1 --max-num-seqs 512
    python bench/profile_steps.py --workload tiny --device cpu          # smoke test

Wraps the engine's scheduler and runner with timers (no engine changes), runs
the whole workload once, then profiles a few steps with torch.profiler. The
numbers are for finding the next bottleneck; throughput claims come from
bench/throughput.py.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from throughput import model_dir_for  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


class Timers:
    def __init__(self):
        self.s = collections.defaultdict(float)
        self.n = collections.defaultdict(int)

    def wrap(self, obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[key] += time.perf_counter() - t0
                self.n[key] += 1

        setattr(obj, name, timed)


def main(argv=None) -> int:
    import tempfile

    from pagedbatch import InferenceEngine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also run N steps at full batch under cProfile and print the host functions by own time")
    args = ap.parse_args(argv)

    w = WORKLOADS[args.workload]()
    tmp = tempfile.mkdtemp()
    eng = InferenceEngine(model_dir_for(w, tmp), load_format="dummy", skip_tokenizer_init=True, device=args.device,
                          dtype="bfloat16" if args.device != "cpu" else "float32", block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    e = eng.engine
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    rng = random.Random(7)
    eng.generate([[rng.randrange(10000) for _ in range(len(p))] for p in w.prompts[: args.max_num_seqs]],
                 SamplingParams(max_tokens=4, ignore_eos=True))
    params = [SamplingParams(max_tokens=m, temperature=w.temperature, ignore_eos=True) for m in w.max_tokens]

    t = Timers()
    t.wrap(e.scheduler, "schedule", "schedule")
    t.wrap(e.runner.inputs, "build", "prepare inputs")
    # The engine launches a step in two halves (structured output fills its bitmask in between).
    t.wrap(e.runner, "launch_forward", "runner.launch_forward (host)")
    t.wrap(e.runner, "launch_sampling", "runner.launch_sampling (host)")
    t.wrap(e, "_collect", "engine._collect (incl. the wait)")
    # Inside the launches: where the host time of launch_forward / launch_sampling goes.
    r = e.runner
    if r.graphs is not None:
        t.wrap(r.graphs, "run", "  graphs.run (copies + replay)")
    t.wrap(r, "_logits", "  LM head (launch)")
    t.wrap(r.sampling_batches, "get", "  sampling batch (build or reuse)")
    t.wrap(r, "sampler", "  sampler (launches)")
    t.wrap(e.scheduler, "cache_blocks", "  scheduler.cache_blocks")
    t.wrap(e.runner, "collect", "runner.collect (waits for GPU)")
    kinds = collections.Counter()
    kind_s = collections.defaultdict(float)
    for i, p in enumerate(w.prompts):
        eng.add_request(str(i), p, params[i])
    sync()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        before = e.scheduler.stats.prefill_tokens
        s0 = time.perf_counter()
        e.step()
        dt = time.perf_counter() - s0
        k = "with prefill" if e.scheduler.stats.prefill_tokens > before else "decode-only"
        kinds[k] += 1
        kind_s[k] += dt
    sync()
    wall = time.perf_counter() - t0
    out_tokens = sum(w.max_tokens)
    print(f"\n{args.workload}: {wall:.2f} s, {out_tokens / wall:,.0f} output tok/s, {sum(kinds.values())} steps")
    for k in kinds:
        print(f"  {k:>14}: {kinds[k]:5d} steps, {kind_s[k]:7.2f} s, {1e3 * kind_s[k] / kinds[k]:7.2f} ms/step")
    for k in t.s:
        print(f"  {k:>32}: {t.s[k]:7.3f} s over {t.n[k]} calls, {1e3 * t.s[k] / max(1, t.n[k]):.3f} ms/call")
    # inside launch_forward / launch_sampling / engine._collect
    nested = ("prepare inputs", "runner.collect (waits for GPU)") + tuple(k for k in t.s if k.startswith("  "))
    print(f"  engine step outside launch/collect/schedule: "
          f"{wall - sum(t.s[k] for k in t.s if k not in nested):.3f} s")

    if args.cprofile:
        host_profile(eng, w, args)
    if args.device == "cpu":
        return 0
    from torch.profiler import ProfilerActivity, profile

    for label, prompts, maxt in (("decode at full batch", w.prompts[: args.max_num_seqs], 64),
                                 ("prefill", w.prompts[: 64], 1)):
        for i, p in enumerate(prompts):
            eng.add_request(f"p{label}{i}", [x + 1 + label.startswith("prefill") for x in p], SamplingParams(max_tokens=maxt, ignore_eos=True))
        if label.startswith("decode"):
            while e.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in e.scheduler.running):
                e.step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                if eng.has_unfinished_requests():
                    e.step()
            sync()
        print(f"\n== {label}: {args.profile_steps} steps ==")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
        while eng.has_unfinished_requests():
            e.step()
    return 0


def host_profile(eng, w, args) -> None:
    """Where the host's time goes in decode steps at full batch: Python functions by own time (cProfile)."""
    import cProfile
    import pstats

    from pagedbatch import SamplingParams

    e = eng.engine
    for i, p in enumerate(w.prompts[: args.max_num_seqs]):
        eng.add_request(f"c{i}", [x + 3 for x in p], SamplingParams(max_tokens=args.cprofile + 16, ignore_eos=True,
                                                                      temperature=w.temperature))
    while e.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in e.scheduler.running):
        e.step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.cprofile):
        e.step()
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"\n== host profile: {args.cprofile} decode steps at batch {len(e.scheduler.running)}, "
          f"{1e3 * dt / args.cprofile:.2f} ms/step under cProfile ==")
    pstats.Stats(prof).sort_stats("tottime").print_stats(28)
    while eng.has_unfinished_requests():
        e.step()


if __name__ == "__main__":
    sys.exit(main())
