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

from pagedbatch.config import EngineConfig  # noqa: E402
from throughput import model_dir_for  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


class Timers:
    def __init__(self):
        self.s = collections.defaultdict(float)
        self.n = collections.defaultdict(int)
        self.max = collections.defaultdict(float)

    def wrap(self, obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.s[key] += dt
                self.n[key] += 1
                self.max[key] = max(self.max[key], dt)

        setattr(obj, name, timed)


def main(argv=None) -> int:
    import tempfile

    from pagedbatch import InferenceEngine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's, 64 on a GPU)")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also run N steps at full batch under cProfile and print the host functions by own time")
    ap.add_argument("--trace-steps", type=int, default=0, metavar="N",
                    help="also run the workload's first N steps again, one at a time with a sync after each, and "
                         "print each step's shape, host time and GPU wait, then profile those steps' kernels")
    ap.add_argument("--fuse-fp8-quant", action=argparse.BooleanOptionalAction, default=None,
                    help="fp8 weights: whether the norm / SiLU kernels quantize the activations "
                         "(linear.FUSE_FP8_QUANT, on by default)")
    ap.add_argument("--prefill-v-tile", type=int, default=None, metavar="N",
                    help="fp8 KV cache: steps with prefill write V by tiles of N tokens "
                         "(triton_backend.PREFILL_V_TILE; 0 = token by token)")
    ap.add_argument("--sync-debug", type=int, default=0, metavar="N",
                    help="also run the workload's first N steps again under torch.cuda.set_sync_debug_mode and "
                         "print where the host synchronized with the GPU (stack, count)")
    ap.add_argument("--cprofile-prefill", action="store_true",
                    help="also run the step that prefills the workload's first prompt (fresh ids) under cProfile, "
                         "then wait for it, and print the host functions by own time")
    ap.add_argument("--runs", type=int, default=0, metavar="N",
                    help="also run the whole workload N more times (fresh ids), one line each: wall, its steps with "
                         "prefill and its decode-only steps, and the time Python's garbage collector took")
    ap.add_argument("--time-parts", action="store_true",
                    help="also time the forward's parts on the host (the layer's linears, norms, attention, the fp8 "
                         "GEMM routes): total, calls and the longest call. Decode steps replay graphs, so these "
                         "count the steps with prefill; a longest call of milliseconds is a launch that blocked")
    ap.add_argument("--runs-v-tiles", default=None, metavar="N,M,...",
                    help="with --runs: run i sets triton_backend.PREFILL_V_TILE to the list's (i mod its length)-th "
                         "entry, so tiles alternate within one process (prefill graphs keep the tile they were "
                         "captured with)")
    ap.add_argument("--runs-kernels", type=int, default=0, metavar="N",
                    help="with --runs: record each run's first N steps' kernels (torch.profiler, CUDA only) and "
                         "print their wall time against the GPU's kernel time, with the largest kernels: a slow "
                         "run whose kernels took no longer was slow on the host")
    ap.add_argument("--prefill-graph-max-tokens", type=int, default=EngineConfig.prefill_graph_max_tokens)
    ap.add_argument("--warm-lm-head", action="store_true",
                    help="before the timed run, also run the LM head once at every row count up to --max-num-seqs "
                         "(do its slow launches in steps with prefill come from kernels first used at a new count?)")
    ap.add_argument("--step-detail", type=int, default=30, metavar="N",
                    help="print the timed run's first N steps one by one: shape, wall time and where it went "
                         "(launches, LM head, waiting for the GPU, scheduling), cudaMalloc/cudaFree calls and "
                         "reserved memory added, garbage-collector time")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="also run N consecutive decode steps at full batch (after 8 unprofiled ones) under "
                         "torch.profiler and compare their wall time with the GPU's busy time: idle gaps between "
                         "kernels (where, how long) against kernels slower than in a short burst")
    args = ap.parse_args(argv)

    if args.fuse_fp8_quant is not None:
        from pagedbatch.engine.models import linear as linear_mod
        linear_mod.FUSE_FP8_QUANT = args.fuse_fp8_quant
    if args.prefill_v_tile is not None:
        from pagedbatch.engine.attention import triton_backend
        triton_backend.PREFILL_V_TILE = args.prefill_v_tile
    w = WORKLOADS[args.workload]()
    tmp = tempfile.mkdtemp()
    eng = InferenceEngine(model_dir_for(w, tmp), load_format="dummy", skip_tokenizer_init=True, device=args.device,
                          dtype="bfloat16" if args.device != "cpu" else "float32", block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                          prefill_graph_max_tokens=args.prefill_graph_max_tokens)
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
    if args.time_parts:
        from pagedbatch.engine.models import linear as linear_mod, llama as llama_mod
        for name in ("norm_linear", "linear", "silu_mul_linear"):
            t.wrap(llama_mod, name, f"  part: llama.{name}")
        for name in ("_scaled_mm", "_fp8_matmul", "quantize_per_token", "route"):
            t.wrap(linear_mod, name, f"  part: linear.{name}")
        t.wrap(llama_mod.Attention, "attend", "  part: Attention.attend (with o_proj)")
        t.wrap(r.backend, "forward", "  part: backend.forward")
    kinds = collections.Counter()
    kind_s = collections.defaultdict(float)
    for i, p in enumerate(w.prompts):
        eng.add_request(str(i), p, params[i])
    if args.warm_lm_head:
        t_warm = time.perf_counter()
        with torch.inference_mode():
            for m in range(1, args.max_num_seqs + 1):
                r.model.compute_logits(torch.zeros(m, r.args.hidden_size, dtype=r.dtype, device=r.device))
        sync()
        print(f"LM head run at 1..{args.max_num_seqs} rows before the timed run: {time.perf_counter() - t_warm:.2f} s")
    compiled_before = triton_variants()
    probe = StepProbe(t, e, args.device, args.step_detail, prefill=True)
    # Decode-only steps by batch size: steps, wall s, s waiting for the GPU in collect. A bucket whose steps
    # hardly wait is host-bound: a faster kernel cannot shorten it.
    by_rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    sync()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        before = e.scheduler.stats.prefill_tokens
        wait_before = t.s["runner.collect (waits for GPU)"]
        probe.before()
        s0 = time.perf_counter()
        e.step()
        dt = time.perf_counter() - s0
        k = "with prefill" if e.scheduler.stats.prefill_tokens > before else "decode-only"
        kinds[k] += 1
        kind_s[k] += dt
        if k == "decode-only" and e._inflight is not None:
            b = by_rows[_bucket(len(e._inflight.sample_seqs))]
            b[0] += 1
            b[1] += dt
            b[2] += t.s["runner.collect (waits for GPU)"] - wait_before
        probe.after(k, dt, e._inflight)
    sync()
    wall = time.perf_counter() - t0 - probe.overhead_s
    probe.close()
    compiled = triton_variants()
    if compiled is not None:
        new = {k: n - compiled_before.get(k, 0) for k, n in compiled.items() if n > compiled_before.get(k, 0)}
        print(f"\nTriton kernel variants: {sum(compiled_before.values())} compiled before the timed run "
              f"(warm-up included), {sum(new.values())} more during it{': ' + str(new) if new else ''}")
    if args.device != "cpu":
        ms = torch.cuda.memory_stats()
        print(f"allocator: {ms.get('num_alloc_retries', 0)} allocation retries (each frees cached memory and "
              f"syncs), {ms.get('num_device_alloc', 0)} cudaMalloc calls, {ms.get('num_device_free', 0)} cudaFree")
    probe.report()
    print("  " + probe.prefill_summary())
    out_tokens = sum(w.max_tokens)
    print(f"\n{args.workload}: {wall:.2f} s, {out_tokens / wall:,.0f} output tok/s, {sum(kinds.values())} steps")
    for k in kinds:
        print(f"  {k:>14}: {kinds[k]:5d} steps, {kind_s[k]:7.2f} s, {1e3 * kind_s[k] / kinds[k]:7.2f} ms/step")
    print("  decode-only steps by rows: rows, steps, s, ms/step, of which ms waiting for the GPU "
          "(the previous step's tokens)")
    for lo in sorted(by_rows, reverse=True):
        n, wall_s, wait_s = by_rows[lo]
        print(f"    {_bucket_name(lo):>9}: {n:5d} steps, {wall_s:6.2f} s, {1e3 * wall_s / n:6.2f} ms/step, "
              f"wait {1e3 * wait_s / n:6.2f}")
    for k in t.s:
        print(f"  {k:>32}: {t.s[k]:7.3f} s over {t.n[k]} calls, {1e3 * t.s[k] / max(1, t.n[k]):.3f} ms/call, "
              f"longest {1e3 * t.max[k]:.3f} ms")
    # inside launch_forward / launch_sampling / engine._collect
    nested = ("prepare inputs", "runner.collect (waits for GPU)") + tuple(k for k in t.s if k.startswith("  "))
    print(f"  engine step outside launch/collect/schedule: "
          f"{wall - sum(t.s[k] for k in t.s if k not in nested):.3f} s")

    if args.runs:
        tiles = [int(x) for x in args.runs_v_tiles.split(",")] if args.runs_v_tiles else None
        repeat_runs(eng, w, args.runs, sync, t, args.device, tiles,
                    args.runs_kernels if args.device != "cpu" else 0)
    if args.cprofile:
        host_profile(eng, w, args)
    if args.cprofile_prefill:
        prefill_host_profile(eng, w, sync)
    if args.trace_steps:
        trace_steps(eng, w, args, sync)
    if args.sync_debug:
        find_syncs(eng, w, args)
    if args.timeline and args.device != "cpu":
        timeline(eng, w, args, sync)
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


class StepProbe:
    """What steps spent, as the engine runs them (overlapped): the timers' shares of each step's wall time, the
    CUDA caching allocator's cudaMalloc/cudaFree calls and reserved bytes it added, and the garbage
    collector's pauses. Records the first ``n`` steps, and with ``prefill`` every step with prefill too. A step
    much slower than its neighbours shows here which part grew. Reading the allocator's counters costs host
    time; it is kept out of the steps' wall time and counted in ``overhead_s`` (callers subtract it from a
    run's), and it is read only for the first ``n`` steps and, with ``prefill``, for steps planned while
    prompts wait."""

    COLUMNS = (("runner.launch_forward (host)", "fwd"), ("prepare inputs", "prep"), ("  LM head (launch)", "lm"),
               ("runner.launch_sampling (host)", "samp"), ("engine._collect (incl. the wait)", "coll"),
               ("runner.collect (waits for GPU)", "wait"),
               ("schedule", "sched"), ("  scheduler.cache_blocks", "cache"))

    def __init__(self, timers: Timers, engine, device: str, n: int, prefill: bool = False):
        import gc

        self.t, self.e, self.n, self.prefill, self.cuda = timers, engine, n, prefill, device != "cpu"
        self.rows = []  # (step index, kind, rows, tokens, decode rows, wall s, [timer s], mallocs, frees, bytes, gc s)
        self.steps = 0
        self.overhead_s = 0.0
        self.gc_s = 0.0
        self.gc_n = 0  # collections
        self._gc_t0 = 0.0
        self._gc = gc
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0
            self.gc_n += 1

    def _alloc(self):
        if not self.cuda:
            return (0, 0, 0)
        t0 = time.perf_counter()
        ms = torch.cuda.memory_stats()
        out = (ms.get("num_device_alloc", 0), ms.get("num_device_free", 0), ms.get("reserved_bytes.all.current", 0))
        self.overhead_s += time.perf_counter() - t0
        return out

    def before(self) -> None:
        self._timers = [self.t.s[key] for key, _ in self.COLUMNS]
        self._gc0 = self.gc_s
        read = self.steps < self.n or (self.prefill and bool(self.e.scheduler.waiting))
        self._alloc0 = self._alloc() if read else None

    def after(self, kind: str, wall_s: float, step) -> None:
        i = self.steps
        self.steps += 1
        if not (i < self.n or (self.prefill and kind == "with prefill")):
            return
        a1 = self._alloc() if self._alloc0 is not None else None
        plan = step.plan if step is not None else None
        rows = len(plan.seqs) if plan is not None else 0
        tokens = sum(plan.num_new_tokens) if plan is not None else 0
        decode = sum(1 for n, s in zip(plan.num_new_tokens, plan.seqs)
                     if n == 1 and s.num_computed_tokens >= s.num_prompt_tokens) if plan is not None else 0
        parts = [self.t.s[key] - t0 for (key, _), t0 in zip(self.COLUMNS, self._timers)]
        alloc = tuple(x1 - x0 for x1, x0 in zip(a1, self._alloc0)) if a1 is not None else None
        self.rows.append((i, kind, rows, tokens, decode, wall_s, parts, alloc, self.gc_s - self._gc0))

    def close(self) -> None:
        if self._on_gc in self._gc.callbacks:
            self._gc.callbacks.remove(self._on_gc)

    HEAD = " ".join(f"{name:>6}" for _, name in COLUMNS)

    def report(self) -> None:
        rows = [r for r in self.rows if r[0] < self.n]
        if not rows:
            return
        print(f"the timed run's first {len(rows)} steps, as the engine runs them (overlapped), ms: wall, then "
              "inside it the forward's launches (fwd, of which building the inputs: prep, and the LM head: lm), the "
              "sampler's (samp), reading back and applying the previous step's tokens (coll, of which waiting for "
              "them: wait, and hashing the blocks they filled for the prefix cache: cache), scheduling (sched); cudaMalloc / cudaFree "
              "calls and reserved MiB the step added; garbage collection (gc)")
        print(f"  step kind  rows tokens decode   wall {self.HEAD} malloc  free  +MiB     gc")
        for i, kind, nrows, tokens, decode, wall_s, parts, alloc, gc_s in rows:
            cols = " ".join(f"{1e3 * p:6.1f}" for p in parts)
            mallocs, frees, reserved = alloc if alloc is not None else (0, 0, 0)
            print(f"  {i:4d} {kind[0]:>4} {nrows:5d} {tokens:6d} {decode:6d} {1e3 * wall_s:6.1f} {cols} {mallocs:6d} "
                  f"{frees:5d} {reserved / 2**20:5.0f} {1e3 * gc_s:6.1f}")

    def prefill_summary(self) -> str:
        """The steps with prefill, summed: their count, wall ms and each timer's ms, cudaMalloc calls, gc ms."""
        rows = [r for r in self.rows if r[1] == "with prefill"]
        parts = [sum(r[6][j] for r in rows) for j in range(len(self.COLUMNS))]
        mallocs = sum(r[7][0] for r in rows if r[7] is not None)
        cols = ", ".join(f"{name} {1e3 * p:.0f}" for (_, name), p in zip(self.COLUMNS, parts))
        return (f"{len(rows)} steps with prefill: wall {1e3 * sum(r[5] for r in rows):.0f} ms = {cols}; "
                f"{mallocs} cudaMalloc, gc {1e3 * sum(r[8] for r in rows):.0f} ms")


_BUCKETS = (256, 192, 128, 64, 32, 16, 1)


def _bucket(rows: int) -> int:
    return next(lo for lo in _BUCKETS if rows >= lo) if rows >= 1 else 0


def _bucket_name(lo: int) -> str:
    i = _BUCKETS.index(lo) if lo in _BUCKETS else -1
    if i <= 0:
        return f"{lo}+"
    return f"{lo}-{_BUCKETS[i - 1] - 1}"


def triton_variants():
    """Compiled variants per Triton kernel of ours (None without Triton): a kernel compiled during a timed
    run stalled one of its steps."""
    try:
        from pagedbatch.engine.triton_variants import variant_counts
        return variant_counts()
    except ImportError:
        return None


def repeat_runs(eng, w, n: int, sync, timers: Timers, device: str, v_tiles=None, kernel_steps: int = 0) -> None:
    """The whole workload n more times as the engine runs it (fresh ids each time, so no prefix-cache hits):
    where one run's time goes against another's (W-nano on the H200, 2026-12-04: its 18 steps with prefill
    took 0.34-0.94 s between runs of the same code, its decode-only steps 4.11-4.15 s), Python's garbage
    collector's share (gc.callbacks), and the steps with prefill split as ``StepProbe`` splits them."""
    from pagedbatch import SamplingParams

    e = eng.engine
    params = [SamplingParams(max_tokens=m, temperature=w.temperature, ignore_eos=True) for m in w.max_tokens]
    print(f"\n== {n} more runs of the whole workload ==")
    for r in range(n):
        tile = ""
        if v_tiles:
            from pagedbatch.engine.attention import triton_backend
            triton_backend.PREFILL_V_TILE = v_tiles[r % len(v_tiles)]
            tile = f" (prefill V tile {triton_backend.PREFILL_V_TILE})"
        for i, p in enumerate(w.prompts):
            eng.add_request(f"run{r}-{i}", [(x + 11 + r) % 10000 for x in p], params[i])
        probe = StepProbe(timers, e, device, 0, prefill=True)
        prof = kernels = None
        if kernel_steps:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
        try:
            sync()
            kind_s = collections.defaultdict(float)
            kinds = collections.Counter()
            t0 = time.perf_counter()
            step = 0
            while eng.has_unfinished_requests():
                if prof is not None and step == kernel_steps:
                    sync()
                    t_k = time.perf_counter() - t0
                    prof.__exit__(None, None, None)
                    kernels = (t_k, prof)
                    prof = None
                    t0 = time.perf_counter() - t_k  # the profiler's teardown is not the run's time
                step += 1
                before = e.scheduler.stats.prefill_tokens
                probe.before()
                s0 = time.perf_counter()
                e.step()
                dt = time.perf_counter() - s0
                k = "prefill" if e.scheduler.stats.prefill_tokens > before else "decode"
                kind_s[k] += dt
                kinds[k] += 1
                probe.after("with prefill" if k == "prefill" else "decode-only", dt, e._inflight)
            sync()
            wall = time.perf_counter() - t0 - probe.overhead_s
        finally:
            probe.close()
            if prof is not None:
                prof.__exit__(None, None, None)
        print(f"  run {r + 1}{tile}: {wall:.3f} s, {sum(w.max_tokens) / wall:,.0f} output tok/s; {kinds['prefill']} steps "
              f"with prefill {kind_s['prefill']:.3f} s, {kinds['decode']} decode-only {kind_s['decode']:.3f} s; "
              f"gc {1e3 * probe.gc_s:.0f} ms in {probe.gc_n} collections", flush=True)
        print(f"    {probe.prefill_summary()}", flush=True)
        if kernels is not None:
            t_k, kp = kernels
            avg = [a for a in kp.key_averages() if getattr(a, "self_device_time_total", 0) > 0]
            total = sum(a.self_device_time_total for a in avg) / 1e3
            top = sorted(avg, key=lambda a: -a.self_device_time_total)[:6]
            print(f"    first {kernel_steps} steps: wall {1e3 * t_k:.0f} ms (profiled), kernels {total:.0f} ms; "
                  + ", ".join(f"{a.key[:40]} {a.self_device_time_total / 1e3:.1f} ms/{a.count}" for a in top),
                  flush=True)


def trace_steps(eng, w, args, sync) -> None:
    """The workload's first N steps (where prefill happens), each run alone: what each step computes, how long
    the host took to run ``step()`` (schedule, collect the previous step, launch this one) and how long it then
    waited for the GPU. Fresh token ids, so nothing comes from the prefix cache. Then the same steps once more
    under torch.profiler, kernels by GPU time and host ops by own CPU time."""
    from pagedbatch import SamplingParams

    e = eng.engine
    plans = []
    schedule = e.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        decode = sum(1 for n, s in zip(plan.num_new_tokens, plan.seqs) if n == 1 and s.num_computed_tokens >= s.num_prompt_tokens)
        plans.append((len(plan.seqs), sum(plan.num_new_tokens), decode))
        return plan

    params = [SamplingParams(max_tokens=m, temperature=w.temperature, ignore_eos=True) for m in w.max_tokens]
    for rnd, do_profile in ((5, False), (6, True)):
        for i, p in enumerate(w.prompts):
            eng.add_request(f"t{rnd}-{i}", [(x + rnd) % 10000 for x in p], params[i])
        e.scheduler.schedule = recording_schedule
        plans.clear()
        rows = []
        if do_profile:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device != "cpu" else []))
            prof.__enter__()
        for _ in range(args.trace_steps):
            if not eng.has_unfinished_requests():
                break
            t0 = time.perf_counter()
            e.step()
            t1 = time.perf_counter()
            sync()
            rows.append((t1 - t0, time.perf_counter() - t1))
        if do_profile:
            prof.__exit__(None, None, None)
        e.scheduler.schedule = schedule
        if not do_profile:
            print(f"\n== the first {len(rows)} steps, each alone (host: step(); GPU: the sync after it) ==")
            print(f"{'step':>4} {'rows':>5} {'tokens':>6} {'decode rows':>11} {'host ms':>8} {'GPU wait ms':>11}")
            for k, ((n, tok, dec), (h, g)) in enumerate(zip(plans, rows)):
                print(f"{k:4d} {n:5d} {tok:6d} {dec:11d} {1e3 * h:8.2f} {1e3 * g:11.2f}")
            print(f"total: host {sum(r[0] for r in rows):.3f} s, GPU wait {sum(r[1] for r in rows):.3f} s")
        else:
            print(f"\n== the same {len(rows)} steps under torch.profiler, by GPU time ==")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60))
            print("== by own CPU time ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=60))
        while eng.has_unfinished_requests():
            e.step()


def find_syncs(eng, w, args) -> None:
    """The workload's first N steps with torch's sync debug mode on: every host-device synchronization that
    torch flags (an .item(), a blocking copy, a nonzero, ...), counted by the engine's stack frames."""
    import traceback
    import warnings

    from pagedbatch import SamplingParams

    e = eng.engine
    sites = collections.Counter()
    here = os.path.dirname(HERE)

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(here) and "bench" not in f.filename]
        site = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        sites[site or "(outside pagedbatch: torch or the profiler itself)"] += 1

    params = [SamplingParams(max_tokens=m, temperature=w.temperature, ignore_eos=True) for m in w.max_tokens]
    for i, p in enumerate(w.prompts):
        eng.add_request(f"s{i}", [(x + 11) % 10000 for x in p], params[i])
    cuda = args.device != "cpu"
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(args.sync_debug):
                if eng.has_unfinished_requests():
                    e.step()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    print(f"\n== host-device syncs torch flagged in the first {args.sync_debug} steps ({sum(sites.values())}) ==")
    for site, n in sites.most_common(20):
        print(f"  {n:5d}  {site}")
    while eng.has_unfinished_requests():
        e.step()


def timeline(eng, w, args, sync) -> None:
    """N consecutive full-batch decode steps as the engine runs them (overlapped): wall time against the union of
    the GPU's kernel and copy intervals. Busy close to wall with kernels slower than the short profile's means the
    GPU itself ran slower (clocks); busy well under wall means idle gaps, listed with the kernels around them."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from pagedbatch import SamplingParams

    e = eng.engine
    n = args.timeline
    for i, p in enumerate(w.prompts[: args.max_num_seqs]):
        eng.add_request(f"tl{i}", [(x + 5) % 10000 for x in p], SamplingParams(max_tokens=n + 24, ignore_eos=True,
                                                                               temperature=w.temperature))
    while e.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in e.scheduler.running):
        e.step()
    for _ in range(8):
        e.step()
    rows = len(e.scheduler.running)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            e.step()
        wall = time.perf_counter() - t0
    sync()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    gpu = sorted((ev["ts"], ev["ts"] + ev.get("dur", 0), ev.get("name", "?")) for ev in events
                 if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        print("\n== timeline: the profiler recorded no GPU events ==")
        return
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = gpu[0]
    for s, t_end, name in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_name, name))
            cur_s = s
        if t_end >= cur_e:
            cur_e, cur_name = t_end, name
    busy += cur_e - cur_s
    span = gpu[-1][1] - gpu[0][0]
    ksum = sum(t_end - s for s, t_end, _ in gpu)
    print(f"\n== timeline: {n} decode steps at {rows} rows, overlapped as the engine runs ==")
    print(f"  wall {1e3 * wall / n:.2f} ms/step; GPU span {span / 1e3 / n:.2f} ms/step, busy {busy / 1e3 / n:.2f}, "
          f"kernel sum {ksum / 1e3 / n:.2f}; idle {sum(g[0] for g in gaps) / 1e3 / n:.3f} ms/step in "
          f"{len(gaps) / n:.1f} gaps/step")
    by_pair = collections.defaultdict(lambda: [0, 0.0])
    for g, a, b in gaps:
        k = (a[:48], b[:48])
        by_pair[k][0] += 1
        by_pair[k][1] += g
    print("  idle gaps by the kernels around them: count, us per step, after -> before")
    for (a, b), (c, g) in sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"    {c:5d} {g / n:8.1f}  {a} -> {b}")
    per = collections.defaultdict(lambda: [0, 0.0])
    for s, t_end, name in gpu:
        per[name[:60]][0] += 1
        per[name[:60]][1] += t_end - s
    print("  kernels by time: calls per step, us per call, us per step")
    for name, (c, d) in sorted(per.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"    {c / n:7.1f} {d / c:9.1f} {d / n:9.1f}  {name}")
    while eng.has_unfinished_requests():
        e.step()


def prefill_host_profile(eng, w, sync) -> None:
    """One step prefilling one prompt, as a single-stream job's first step: host time under cProfile (the step
    runs eagerly, outside the decode graphs), then the GPU time left after it, twice (the second with warm
    caches of every kind: allocator, cuBLAS heuristics, sampling batch)."""
    import cProfile
    import pstats

    from pagedbatch import SamplingParams

    e = eng.engine
    for rnd in (1, 2):
        eng.add_request(f"cp{rnd}", [(x + 17 * rnd) % 10000 for x in w.prompts[0]],
                        SamplingParams(max_tokens=2, ignore_eos=True, temperature=w.temperature))
        sync()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        e.step()
        prof.disable()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        print(f"\n== prefill step of one {len(w.prompts[0])}-token prompt ({rnd}): host {1e3 * (t1 - t0):.2f} ms "
              f"under cProfile, then {1e3 * (t2 - t1):.2f} ms waiting for the GPU ==")
        if rnd == 2:
            pstats.Stats(prof).sort_stats("tottime").print_stats(24)
        while eng.has_unfinished_requests():
            e.step()


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
