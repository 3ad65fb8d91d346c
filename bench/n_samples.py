"""n samples per prompt against the same rows written out as n copies, with prefix caching on and off, in one run.

    python bench/n_samples.py                                  # 128 W1 prompts x n=8, 256 tokens, Qwen2.5-7B shape
    python bench/n_samples.py --workload tiny --device cpu --num-kv-blocks 512   # smoke test of the script

The n=8 rows are 128 requests with ``SamplingParams(n=8, seed=i)``: each
prompt is computed once and its KV blocks are shared by its 8 samples. The
copies are the same 1,024 rows as separate n=1 requests, copy j of prompt i
seeded ``sample_seed(i, j)``, i.e. the very samples the n=8 request draws
(on the CPU in float32 the tokens are identical; on the GPU in bf16 the
batch shapes differ, so a sample may drift after a near-tie; the table says
how many matched). With prefix caching on, the copies of a prompt wait for
its first copy's full blocks and reuse them, so only the partly filled last
block is computed 8 times; with it off every copy computes the whole prompt.

Every variant gets a fresh engine (an earlier run's blocks must not sit in
the prefix cache) and a warm-up on other random prompts. Temperature 1,
EOS ignored, ``load_format=dummy`` weights. ``max_num_seqs`` defaults to
1,024 so that all 1,024 sequences fit in one batch, and both forms decode in
the same batch shape: the measured difference is the prompt work and the KV
memory the samples share (the KV cache of 1,024 sequences of at most 768
tokens is 45 GB on this shape, well inside an H200's ~140 GB).

Prints one table and writes JSON under bench/results/ (like throughput.py).
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
from workloads import Workload, tiny, w1  # noqa: E402

WORKLOADS = {"W1": lambda: w1(128), "tiny": tiny}  # W1's first 128 prompts (128-512 tokens), 256 tokens each


def run_variant(w: Workload, model_dir: str, n: int, as_copies: bool, caching: bool, args) -> dict:
    from pagedbatch import InferenceEngine, SamplingParams
    from pagedbatch.sampling_params import sample_seed

    options = dict(load_format="dummy", skip_tokenizer_init=True, device=args.device, dtype=args.dtype,
                   block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching,
                   gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    if args.num_kv_blocks:
        options["num_kv_blocks"] = args.num_kv_blocks
    eng = InferenceEngine(model_dir, **options)
    base = dict(temperature=1.0, ignore_eos=True)
    if as_copies:
        prompts = [p for p in w.prompts for _ in range(n)]
        params = [SamplingParams(max_tokens=m, seed=sample_seed(i, j), **base)
                  for i, m in enumerate(w.max_tokens) for j in range(n)]
    else:
        prompts = w.prompts
        params = [SamplingParams(n=n, max_tokens=m, seed=i, **base) for i, m in enumerate(w.max_tokens)]
    # Warm-up in the same form on other random prompts (the workload's own would sit in the prefix cache).
    rng = random.Random(12345)
    warm = [[rng.randrange(0, 10000) for _ in range(len(p))] for p in w.prompts[:16]]
    warm_n = 1 if as_copies else n
    eng.generate(warm * (n if as_copies else 1), SamplingParams(n=warm_n, max_tokens=4, seed=0, **base))
    e = eng.engine
    e.scheduler.stats = type(e.scheduler.stats)()
    bm = e.block_manager
    bm.hit_tokens = bm.queried_tokens = bm.peak_used_blocks = bm.num_cow_copies = 0
    sync(args.device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    sync(args.device)
    wall = time.perf_counter() - t0
    out_tokens = sum(o.output_tokens for o in outs)
    assert out_tokens == n * w.output_tokens, (out_tokens, n * w.output_tokens)
    stats = e.stats()
    assert stats["free_blocks"] == stats["num_blocks"], "blocks leaked"
    res = {"variant": f"{n} copies" if as_copies else f"n={n}", "prefix_caching": caching, "requests": len(prompts),
           "samples": len(outs), "wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
           "prefill_tokens": stats["prefill_tokens"], "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
           "forked_seqs": stats["forked_seqs"], "cow_block_copies": stats["cow_block_copies"],
           "peak_used_blocks": stats["peak_used_blocks"], "num_blocks": stats["num_blocks"],
           "preemptions": stats["preemptions"], "steps": stats["steps"], "stats": stats,
           "tokens": [o.token_ids for o in outs]}
    eng.shutdown()
    del eng, e, bm
    free(args.device)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--caching", default="on,off", help="prefix caching settings to run: on, off or on,off")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's, 64 on a GPU)")
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV cache size (CPU smoke runs)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    w = WORKLOADS[args.workload]()
    device = torch.device(args.device)
    settings = [{"on": True, "off": False}[c] for c in args.caching.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(w, tmp)
        for caching in settings:
            for as_copies in (False, True):
                rows.append(run_variant(w, model_dir, args.n, as_copies, caching, args))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{w.name}[:{len(w.prompts)}] x n={args.n} on {w.model_config}: {len(w.prompts)} prompts "
          f"({w.prompt_tokens} tokens), {args.n * w.output_tokens} output tokens, temperature 1, seeded, "
          f"{device_name}, max_num_seqs {args.max_num_seqs}")
    print(f"{'variant':<11}{'caching':>8}{'requests':>9}{'out tok/s':>11}{'prefill tok':>12}{'cache hits':>11}"
          f"{'forked':>8}{'CoW':>6}{'wall s':>9}{'vs copies':>10}{'same':>7}")
    for r in rows:
        copies = next(c for c in rows if c["prefix_caching"] == r["prefix_caching"] and c["variant"] != f"n={args.n}")
        n_row = next(c for c in rows if c["prefix_caching"] == r["prefix_caching"] and c["variant"] == f"n={args.n}")
        r["speedup_vs_copies"] = r["output_tok_s"] / copies["output_tok_s"]
        # Samples of the copies identical to the n=8 request's (both lists are prompt-major, sample-minor).
        r["same_tokens_fraction"] = sum(a == b for a, b in zip(r["tokens"], n_row["tokens"])) / len(r["tokens"])
        print(f"{r['variant']:<11}{'on' if r['prefix_caching'] else 'off':>8}{r['requests']:>9}"
              f"{r['output_tok_s']:>11.0f}{r['prefill_tokens']:>12}{r['prefix_cache_hit_tokens']:>11}"
              f"{r['forked_seqs']:>8}{r['cow_block_copies']:>6}{r['wall_s']:>9.2f}{r['speedup_vs_copies']:>9.2f}x"
              f"{100 * r['same_tokens_fraction']:>6.0f}%")
    for r in rows:
        del r["tokens"]
    result = {
        "workload": f"{w.name}[:{len(w.prompts)}] x n={args.n}", "model_config": w.model_config,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/n_samples.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_name, "torch": torch.__version__, "rows": rows, "args": vars(args),
        "targets": "n=8 >= copies with prefix caching on; >= 1.3x copies with prefix caching off",
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"n-samples-{w.name}-{datetime.date.today().isoformat()}-{device_name.replace(' ', '_')}{args.tag}.json"
    path = os.path.join(args.results_dir, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
