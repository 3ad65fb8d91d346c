"""Scheduling choices measured: policy x prefix cache x admission order x block size, one engine per run.

    python bench/scheduling.py --workload W2 --runs fcfs/cache/input fcfs/nocache/input fcfs/cache/prefix
    python bench/scheduling.py --workload W1 --runs fcfs/cache/input/bs64      # block size 64
    python bench/scheduling.py --workload W3 --runs fcfs/cache/input/kv3000 fcfs/cache/prefix/kv3000
    python bench/scheduling.py --workload tiny --device cpu --runs fcfs/cache/input sjf-align/nocache/length

A run is policy/cache|nocache/order[/bsN][/kvN] (block size N; a KV cache of
exactly N blocks, to see what an order does when the cache is short). Requests are added in the chosen
order (the job runner's ``admission_order`` over the whole workload) and the
engine runs them to the end. Prints one table (output tok/s, p50/p99 latency,
prefix-cache hit rate, padding-free decode steps, preemptions) and appends
JSON to bench/results/scheduling-<workload>-<date>-<device><tag>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from throughput import free, model_dir_for, sync  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def parse_run(spec: str) -> dict:
    parts = spec.split("/")
    extra = {p[:2]: p[2:] for p in parts[3:]}
    if (len(parts) < 3 or parts[1] not in ("cache", "nocache") or len(extra) != len(parts) - 3
            or not set(extra) <= {"bs", "kv"} or not all(v.isdigit() for v in extra.values())):
        raise SystemExit(f"bad run {spec!r}: want policy/cache|nocache/order[/bsN][/kvN]")
    return {"policy": parts[0], "cache": parts[1] == "cache", "order": parts[2],
            "block_size": int(extra["bs"]) if "bs" in extra else None,  # None: the engine's default
            "num_kv_blocks": int(extra["kv"]) if "kv" in extra else None}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def run_one(w, model_dir, spec, args) -> dict:
    from pagedbatch import InferenceEngine, SamplingParams
    from pagedbatch.jobs.ordering import admission_order

    r = parse_run(spec)
    eng = InferenceEngine(model_dir, load_format="dummy", skip_tokenizer_init=True, device=args.device,
                          dtype="bfloat16" if args.device != "cpu" else "float32", block_size=r["block_size"],
                          max_num_seqs=args.max_num_seqs, scheduling_policy=r["policy"],
                          enable_prefix_caching=r["cache"], gpu_memory_utilization=0.9,
                          num_kv_blocks=r["num_kv_blocks"])
    rng = random.Random(99)  # warm-up on other prompts: compile, fill the allocator
    eng.generate([[rng.randrange(10000) for _ in range(200)] for _ in range(64)],
                 SamplingParams(max_tokens=4, ignore_eos=True))
    e = eng.engine
    e.scheduler.stats = type(e.scheduler.stats)()
    bm = e.block_manager
    bm.hit_tokens = bm.queried_tokens = bm.peak_used_blocks = 0
    rows = list(admission_order(iter(range(len(w.prompts))), r["order"], len(w.prompts) + 1,
                                key_ids=lambda i: w.prompts[i]))
    sync(args.device)
    t0 = time.perf_counter()
    for i in rows:
        e.add_request(str(i), w.prompts[i], SamplingParams(max_tokens=w.max_tokens[i], temperature=w.temperature,
                                                            ignore_eos=True))
    lat = []
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                lat.append(o.timings.latency_s)
    sync(args.device)
    wall = time.perf_counter() - t0
    st = e.stats()
    res = {"run": spec, **r, "wall_s": wall, "output_tok_s": w.output_tokens / wall,
           "p50_latency_s": pct(lat, 0.5), "p99_latency_s": pct(lat, 0.99),
           "hit_rate": st["prefix_cache_hit_rate"], "padding_free_fraction": st["padding_free_fraction"],
           "mean_length_spread": st["mean_length_spread"], "mean_decode_batch": st["mean_decode_batch"],
           "preemptions": st["preemptions"], "num_blocks": st["num_blocks"], "steps": st["steps"]}
    del eng, e
    free(args.device)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--stop-after-s", type=float, default=None, help="skip the remaining runs after this long")
    args = ap.parse_args(argv)
    for spec in args.runs:
        parse_run(spec)
    w = WORKLOADS[args.workload]()
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    name = f"scheduling-{w.name}-{datetime.date.today().isoformat()}-{device_name.replace(' ', '_')}{args.tag}.json"
    path = os.path.join(args.results_dir, name)
    os.makedirs(args.results_dir, exist_ok=True)
    print(f"{w.name}: {len(w.prompts)} prompts, {w.prompt_tokens} prompt / {w.output_tokens} output tokens, {device_name}")
    print(f"{'run':<28}{'out tok/s':>10}{'p50 s':>8}{'p99 s':>8}{'hit':>7}{'pad-free':>9}{'spread':>8}{'preempt':>8}")
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(w, tmp)
        for spec in args.runs:
            if args.stop_after_s and time.perf_counter() - start > args.stop_after_s:
                print(f"{spec:<28} skipped (time limit)")
                continue
            try:
                r = run_one(w, model_dir, spec, args)
            except Exception as e:  # one failing run must not hide the others
                r = {"run": spec, "error": f"{type(e).__name__}: {e}"}
                print(f"{spec:<28} failed: {r['error']}")
                free(args.device)
            else:
                print(f"{spec:<28}{r['output_tok_s']:>10.0f}{r['p50_latency_s']:>8.2f}{r['p99_latency_s']:>8.2f}"
                      f"{r['hit_rate']:>7.1%}{r['padding_free_fraction']:>9.1%}{r['mean_length_spread']:>8.0f}"
                      f"{r['preemptions']:>8d}", flush=True)
            results.append(r)
            with open(path, "w") as f:
                json.dump({"workload": w.name, "device": device_name, "torch": torch.__version__,
                           "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "command": "python bench/scheduling.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens, "runs": results},
                          f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
