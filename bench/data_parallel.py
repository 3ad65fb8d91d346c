"""Data-parallel scaling of the job runner: a workload on 1 GPU and on N GPUs, in the same run.

    python bench/data_parallel.py --workload W1 --sizes 1,2,4          # weak scaling: 512 prompts per GPU
    python bench/data_parallel.py --workload W1 --sizes 1,2,4,8 --scaling strong   # the same 512 prompts for all
    python bench/data_parallel.py --workload tiny --sizes 1,2 --device cpu          # smoke test of the script

Each size runs the real job (``run_batch.py --data-parallel-size N``) in a
fresh process, on random weights (``--load-format dummy``) of the workload's
model config, with token-id prompts and EOS ignored, so every run produces
exactly the workload's output tokens. Throughput is output tokens over the
job's processing wall time from its report (from the moment every worker has
loaded its model to the last commit), so it includes what data parallelism
costs: the parent's preparing and dealing, Parquet commits, the slowest
worker's tail. The table compares N workers with N x the one-worker run;
the target is >= 90%.

Weak scaling (the default) gives each GPU the workload's full size (N x 512
prompts for W1; copy k of the workload has its first prompt token shifted by
k, so copies share no cache blocks), which is what a large job sees. Strong
scaling splits the same prompts N ways, so each GPU runs smaller batches.

A warm-up job (other prompts, one worker) runs first so that Triton's
compiled kernels are on disk for every timed run alike. Writes JSON under
bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from workloads import WORKLOADS, Workload  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(ROOT, "..", "shared", "models", "qwen2-tokenizer")
# Never a token id that the workload or the tiny model's 10,240-token vocabulary lacks.
_SHIFT_MOD = 10_000


def replicate(w: Workload, copies: int) -> Workload:
    """``copies`` copies of a workload whose prompts share no cache block across copies."""
    prompts, max_tokens = [], []
    for k in range(copies):
        for p in w.prompts:
            prompts.append(p if k == 0 else [(p[0] + k) % _SHIFT_MOD] + p[1:])
        max_tokens += w.max_tokens
    return Workload(w.name, w.model_config, prompts, max_tokens, w.temperature)


def model_dir_for(w: Workload, tmp: str, tokenizer_dir: str) -> str:
    """A config-only model directory (random weights) with a tokenizer beside it for the job's text output."""
    d = os.path.join(tmp, "model")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "configs", "models", w.model_config), os.path.join(d, "config.json"))
    for name in os.listdir(tokenizer_dir):
        if name in ("config.json", "generation_config.json", "README.md") or name.endswith((".safetensors", ".bin")):
            continue
        os.symlink(os.path.abspath(os.path.join(tokenizer_dir, name)), os.path.join(d, name))
    return d


def write_input(w: Workload, path: str, text_tokenizer=None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ids, m in zip(w.prompts, w.max_tokens):
            row = {"max_tokens": m, "ignore_eos": True}
            if text_tokenizer is not None:
                row["prompt"] = text_tokenizer.decode(ids)  # the parent then tokenizes every row
            else:
                row["prompt_token_ids"] = ids
            f.write(json.dumps(row) + "\n")


def run_job(w: Workload, size: int, model_dir: str, tmp: str, args, tag: str) -> dict:
    src = os.path.join(tmp, f"in-{tag}.jsonl")
    out = os.path.join(tmp, f"out-{tag}")
    write_input(w, src, args.text_tokenizer)
    cmd = [sys.executable, os.path.join(ROOT, "run_batch.py"), "--input", src, "--output", out, "--model", model_dir,
           "--load-format", "dummy", "--device", args.device, "--dtype", args.dtype, "--quiet",
           "--temperature", str(w.temperature), "--engine-seed", "0",
           *(["--block-size", str(args.block_size)] if args.block_size else []),
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--data-parallel-size", str(size), "--commit-interval-s", "600"]
    if args.device == "cpu":
        cmd += ["--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
    else:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.enforce_eager:
        cmd += ["--enforce-eager"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the {tag} job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    got = report["tokens"]["output"]
    if got != w.output_tokens or report["rows"]["failed"]:
        raise SystemExit(f"the {tag} job produced {got} output tokens and {report['rows']['failed']} failed rows; "
                         f"expected {w.output_tokens} and 0")
    wall = report["time"]["wall_s"]
    workers = report.get("workers") or []
    return {
        "size": size, "gpus": size * args.tensor_parallel_size if args.device != "cpu" else 0,
        "prompts": len(w.prompts), "output_tokens": got, "prompt_tokens": report["tokens"]["prompt"],
        "wall_s": wall, "output_tok_s": got / wall, "process_s": elapsed,
        "device_name": report.get("device_name"),
        "workers": [{k: x[k] for k in ("worker", "rows", "output_tokens", "wall_s", "output_tokens_per_s", "placement")}
                    for x in workers],
        "kv_peak_fraction": report["kv_cache"].get("peak_fraction"),
        "mean_decode_batch": (report.get("batching") or {}).get("mean_decode_batch"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--sizes", default="1,2,4", help="comma list of --data-parallel-size values; must include 1")
    ap.add_argument("--scaling", choices=("weak", "strong"), default="weak")
    ap.add_argument("--device", default=None, help="cuda or cpu [cuda if available]")
    ap.add_argument("--dtype", default=None, help="[bfloat16 on cuda, float32 on cpu]")
    ap.add_argument("--tokenizer", default=None,
                    help=f"tokenizer directory for the job's text output [{DEFAULT_TOKENIZER} if present, "
                         "else the demo model's byte-level one]")
    ap.add_argument("--text-prompts", action="store_true",
                    help="give prompts as text (decoded ids), so the parent tokenizes every row as in a real job")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per worker (needs the TP engine)")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's, 64 on a GPU)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if 1 not in sizes or min(sizes) < 1:
        raise SystemExit("--sizes must include 1 (the baseline) and only sizes >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device != "cpu" else "float32")
    tokenizer_dir = args.tokenizer or (DEFAULT_TOKENIZER if os.path.isdir(DEFAULT_TOKENIZER) else None)
    if tokenizer_dir is None:
        from pagedbatch.demo import demo_model_dir

        tokenizer_dir = demo_model_dir()
    args.text_tokenizer = None
    if args.text_prompts:
        from pagedbatch.engine.tokenizer import load_tokenizer

        args.text_tokenizer = load_tokenizer(tokenizer_dir)

    base = WORKLOADS[args.workload]()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(base, tmp, tokenizer_dir)
        if not args.no_warmup:
            rng = random.Random(54321)
            warm = Workload("warm-up", base.model_config,
                            [[rng.randrange(0, _SHIFT_MOD) for _ in range(len(p))] for p in base.prompts[:64]],
                            [4] * min(64, len(base.prompts)), base.temperature)
            run_job(warm, 1, model_dir, tmp, args, "warmup")
        for n in sizes:
            w = replicate(base, n) if args.scaling == "weak" else base
            rows.append(run_job(w, n, model_dir, tmp, args, f"dp{n}"))
            r = rows[-1]
            print(f"  data parallel {n}: {r['output_tok_s']:.0f} out tok/s over {r['wall_s']:.2f} s", flush=True)

    one = next(r for r in rows if r["size"] == 1)
    for r in rows:
        r["per_worker_tok_s"] = r["output_tok_s"] / r["size"]
        r["efficiency"] = r["output_tok_s"] / (r["size"] * one["output_tok_s"])
        walls = [x["wall_s"] for x in r["workers"] if x["wall_s"] is not None]
        r["worker_wall_spread_s"] = (max(walls) - min(walls)) if walls else 0.0
    per = len(base.prompts)
    print(f"\n{base.name} ({args.scaling} scaling: {per} prompts {'per worker' if args.scaling == 'weak' else 'in all'}), "
          f"{rows[-1]['device_name'] or args.device}, {args.dtype}, tensor parallel {args.tensor_parallel_size}")
    print(f"{'workers':>8}{'prompts':>9}{'out tok/s':>12}{'per worker':>12}{'vs N x 1':>10}{'wall s':>9}"
          f"{'tail s':>8}{'target':>8}")
    for r in rows:
        ok = "" if r["size"] == 1 else ("ok" if r["efficiency"] >= 0.9 else "MISS")
        print(f"{r['size']:>8}{r['prompts']:>9}{r['output_tok_s']:>12.0f}{r['per_worker_tok_s']:>12.0f}"
              f"{100 * r['efficiency']:>9.1f}%{r['wall_s']:>9.2f}{r['worker_wall_spread_s']:>8.2f}{ok:>8}")
    result = {
        "benchmark": "data_parallel", "workload": base.name, "scaling": args.scaling,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/data_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tokenizer": tokenizer_dir, "rows": rows,
        "args": {k: v for k, v in vars(args).items() if k != "text_tokenizer"},
    }
    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError:
        pass
    os.makedirs(args.results_dir, exist_ok=True)
    device = (rows[-1]["device_name"] or args.device).replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    name = f"dp-{base.name}-{args.scaling}-{datetime.date.today().isoformat()}-{device}{args.tag}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.results_dir, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
