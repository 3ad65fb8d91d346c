"""The tensor-parallel peer: Hugging Face transformers with ``tp_plan="auto"`` under torchrun.

    python bench/hf_tp_peer.py --prepare /data/qwen2.5-7b-random                  # random weights, once
    torchrun --nproc-per-node 2 bench/hf_tp_peer.py --model /data/qwen2.5-7b-random --workload single
    torchrun --nproc-per-node 4 bench/hf_tp_peer.py --model /data/llama3-70b-random --workload W1 --max-prompts 64

``tp_plan`` applies only in ``from_pretrained``, so the peer needs weights on
disk: ``--prepare DIR`` writes the workload's model config (or
``--model-config``) with random bf16 weights (15 GB for the 7B shape, 141 GB
for the 70B one). Prompts are the workload's (bench/workloads.py), run with
``generate`` in static batches with left padding, EOS ignored; rank 0 prints
output tok/s and appends JSON under bench/results/. Compare with
``bench/throughput.py --tensor-parallel-size N`` on the same machine.
Needs ``accelerate`` (transformers asks for it with ``tp_plan``; the GPU image has it).
On the CPU (``--device cpu``, gloo) it only checks that the script runs:
``torchrun --nproc-per-node 2 bench/hf_tp_peer.py --model DIR --workload tiny --device cpu``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from workloads import WORKLOADS  # noqa: E402


def prepare(out: str, config_file: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "configs", "models", config_file), os.path.join(out, "config.json"))
    cfg = AutoConfig.from_pretrained(out)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    print(f"wrote random {config_file} weights to {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", metavar="DIR", help="write random weights for the model config into DIR and exit")
    ap.add_argument("--model", help="a model directory written by --prepare")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="single")
    ap.add_argument("--model-config", default=None, help="file under configs/models/ [the workload's]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-prompts", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    w = WORKLOADS[args.workload]()
    if args.prepare:
        prepare(args.prepare, args.model_config or w.model_config)
        return 0
    if not args.model:
        ap.error("give --model (a directory made with --prepare) or --prepare DIR")

    from transformers import AutoModelForCausalLM

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, tp_plan="auto").eval()
    vocab = model.config.vocab_size
    n = min(len(w.prompts), args.max_prompts)
    prompts = [[t % vocab for t in p] for p in w.prompts[:n]]
    outs = w.max_tokens[:n]

    def run(batch_prompts, m):
        L = max(map(len, batch_prompts))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in batch_prompts], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                              do_sample=False, pad_token_id=0, eos_token_id=None)

    with torch.no_grad():
        run(prompts[:1], 2)  # warm-up outside the timed region
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for i in range(0, n, args.batch):
            run(prompts[i : i + args.batch], max(outs[i : i + args.batch]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        wall = time.perf_counter() - t0
    if rank == 0:
        tok = sum(outs)
        name = f"hf-tp-{w.name}-{datetime.date.today().isoformat()}-x{world}{args.tag}.json"
        res = {"engine": f"hf-tp_plan-auto-x{world}", "workload": w.name, "prompts": n, "output_tokens": tok,
               "wall_s": wall, "output_tok_s": tok / wall, "batch": args.batch,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "command": "torchrun ... bench/hf_tp_peer.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
        print(f"{res['engine']}: {w.name}, {n} prompts, {tok} output tokens in {wall:.2f} s = {tok / wall:.1f} tok/s")
        os.makedirs(args.results_dir, exist_ok=True)
        with open(os.path.join(args.results_dir, name), "w") as f:
            json.dump(res, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
