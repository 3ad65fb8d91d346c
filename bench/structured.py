"""Structured-output throughput: a workload with every row under one JSON schema against the same workload
unconstrained, in the same run, on the same engine.

    python bench/structured.py                                   # W1 (512 x 128-512-token prompts, 256 tokens), GPU
    python bench/structured.py --workload tiny --device cpu      # smoke test of the script (seconds)
    python bench/structured.py --schema my_schema.json --max-tokens 512

Weights are random (load_format=dummy) on the workload's real config; the
prompts are its random token ids. Grammars need a real tokenizer whose
vocabulary matches the model: for the Qwen2.5 shapes, ``--tokenizer``
(default ../shared/models/qwen2-tokenizer beside the repository); the tiny
smoke workload writes a byte-level tokenizer itself.

The unconstrained run ignores EOS and produces max_tokens per row. The
constrained run stops where its schema ends; the default schema (an object
with a title and an array of at least 200 strings) cannot end within 256
tokens, so both runs produce the same number of tokens (with ``--schema``
a random model may stop early: the table reports the mean output length
next to the rates). Prefix caching is off: the second run must not reuse the first one's
KV. Reported per constrained step: the host time spent filling the token
bitmask (mean, p50, p99), which the engine hides behind the forward pass.
Prints one table; writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from throughput import free, model_dir_for, sync  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "models", "qwen2-tokenizer")
# Long outputs by construction: at least 200 strings (two tokens or more each) cannot close within 256 tokens,
# so every constrained row runs to max_tokens, like the unconstrained ones. Plain strings, the common case.
DEFAULT_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"},
    "items": {"type": "array", "items": {"type": "string"}, "minItems": 200}},
    "required": ["title", "items"]}


def add_tokenizer(model_dir: str, workload: str, tokenizer: str) -> None:
    if workload == "tiny":
        from pagedbatch.demo import _write_byte_tokenizer  # the demo's byte-level tokenizer: any vocabulary fits

        from pathlib import Path

        _write_byte_tokenizer(Path(model_dir))
        return
    if not os.path.isdir(tokenizer):
        raise SystemExit(f"no tokenizer at {tokenizer}: give --tokenizer DIR (a Hugging Face tokenizer whose "
                         f"vocabulary matches the model, e.g. Qwen2's for the Qwen2.5 shapes)")
    for name in os.listdir(tokenizer):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(os.path.join(tokenizer, name), model_dir)


def timed(eng, prompts, params) -> tuple[float, list]:
    sync(eng.engine.device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    sync(eng.engine.device)
    return time.perf_counter() - t0, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--schema", default=None, help="a JSON schema file [an object with an array of short strings]")
    ap.add_argument("--max-tokens", type=int, default=256, help="per row, both runs [256]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    from pagedbatch import InferenceEngine, SamplingParams

    w = WORKLOADS[args.workload]()
    schema = DEFAULT_SCHEMA
    if args.schema:
        with open(args.schema, encoding="utf-8") as f:
            schema = json.load(f)
    n = len(w.prompts)
    free_params = SamplingParams(max_tokens=args.max_tokens, temperature=w.temperature, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=w.temperature,
                                 structured_output={"json": schema})
    dtype = "float32" if args.device == "cpu" else args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(w, tmp)
        add_tokenizer(model_dir, args.workload, args.tokenizer)
        t0 = time.perf_counter()
        eng = InferenceEngine(model_dir, load_format="dummy", device=args.device, dtype=dtype,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                              enable_prefix_caching=False)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.engine.check_structured_output(constrained)  # maps the tokenizer and compiles: not timed below
        compile_s = time.perf_counter() - t0
        # Warm-up on other prompts, both paths: kernels, allocator, xgrammar's threads.
        rng = random.Random(12345)
        warm = [[rng.randrange(0, 10000) % len(eng.tokenizer) for _ in range(len(p))] for p in w.prompts[:64]]
        eng.generate(warm, free_params.replace(max_tokens=4))
        eng.generate(warm, constrained.replace(max_tokens=4))
        structured = eng.engine.structured
        free_wall, free_outs = timed(eng, w.prompts, free_params)
        structured.reset_stats()
        con_wall, con_outs = timed(eng, w.prompts, constrained)
        stats = eng.engine.stats()
        eng.shutdown()
        free(args.device)

    free_tokens = sum(o.output_tokens for o in free_outs)
    con_tokens = sum(o.output_tokens for o in con_outs)
    reasons = collections.Counter(o.finish_reason for o in con_outs)
    parsed = 0
    for o in con_outs:
        if o.finish_reason == "stop":
            try:
                json.loads(o.text)
                parsed += 1
            except ValueError:
                pass
    free_tps, con_tps = free_tokens / free_wall, con_tokens / con_wall
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\n{w.name} on {w.model_config}: {n} prompts, {w.prompt_tokens} prompt tokens, max_tokens {args.max_tokens}, "
          f"{device_name}; engine load {load_s:.1f} s, tokenizer mapping + schema compile {compile_s:.2f} s")
    print(f"{'run':<16}{'out tok/s':>11}{'wall s':>9}{'out tokens':>12}{'mean len':>10}{'ratio':>8}")
    print(f"{'unconstrained':<16}{free_tps:>11.0f}{free_wall:>9.2f}{free_tokens:>12}{free_tokens / n:>10.1f}"
          f"{1.0:>8.2f}")
    print(f"{'json schema':<16}{con_tps:>11.0f}{con_wall:>9.2f}{con_tokens:>12}{con_tokens / n:>10.1f}"
          f"{con_tps / free_tps:>8.2f}")
    print(f"constrained: finish reasons {dict(reasons)}; {parsed} of {reasons.get('stop', 0)} stopped outputs parse "
          f"as JSON; bitmask fill per step: mean {stats['bitmask_fill_ms_mean']:.3f} ms, "
          f"p50 {stats['bitmask_fill_ms_p50']:.3f} ms, p99 {stats['bitmask_fill_ms_p99']:.3f} ms over "
          f"{stats['structured_steps']} steps ({stats['structured_rows'] / max(1, stats['structured_steps']):.0f} "
          f"rows/step); {100 * stats['bitmask_fill_s'] / con_wall:.1f}% of the wall time (hidden behind the forward)")
    try:
        import xgrammar  # noqa: F401
        from importlib.metadata import version

        versions = {p: version(p) for p in ("xgrammar", "apache-tvm-ffi", "pydantic", "numpy", "torch", "transformers")}
    except Exception:  # only for the record
        versions = {}
    result = {
        "workload": w.name, "model_config": w.model_config, "device": device_name, "max_tokens": args.max_tokens,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/structured.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "schema": schema, "versions": versions, "load_s": load_s, "compile_s": compile_s,
        "unconstrained": {"wall_s": free_wall, "output_tokens": free_tokens, "output_tok_s": free_tps},
        "constrained": {"wall_s": con_wall, "output_tokens": con_tokens, "output_tok_s": con_tps,
                        "mean_output_tokens": con_tokens / n, "finish_reasons": dict(reasons), "parsed": parsed},
        "ratio": con_tps / free_tps, "stats": stats, "args": vars(args),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"structured-{w.name}-{datetime.date.today().isoformat()}-{device_name.replace(' ', '_')}{args.tag}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.results_dir, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
