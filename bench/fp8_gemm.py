"""fp8 (e4m3) against bf16 for the linear layers of a decode step, on the GPU.

    python bench/fp8_gemm.py                      # Qwen2.5-7B shape, batches 1..512
    python bench/fp8_gemm.py --batches 1,16 --layers 4

A decode step reads every layer's weights once, so the realistic measurement
is a chain over all layers (no weight is reused from L2 between two uses),
captured in a CUDA graph and replayed. For each batch size M it times:
  - bf16: ``F.linear`` over the 4 matmuls of every layer;
  - fp8: ``torch._scaled_mm`` with per-output-channel weight scales and
    per-token activation scales (the activation quantized in plain torch ops);
  - fp8 GEMMs alone (the activation already quantized), to separate the
    quantization's cost;
  - the engine's fp8 path: the activation quantized by its fused Triton kernel,
    then ``torch._scaled_mm`` (``linear.fp8_linear_scaled_mm``), the fused
    kernel alone, and ``linear.linear`` as the engine calls it (the skinny
    GEMM for M <= its limit, that path above it).
Prints ms per chain, effective weight bandwidth, and the speed-up; JSON under
bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pagedbatch.engine.models.fp8 import quantize_per_token  # noqa: E402
from pagedbatch.engine.models.linear import fp8_linear_scaled_mm, linear, route  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor):
    """Per-row (per-token / per-output-channel) scales: x ~= q * scale[:, None]."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_linear(x, w_q, w_scale_row):
    """``w_q``: [N, K] fp8 (row-major), ``w_scale_row``: [1, N] float32."""
    x_q, x_scale = quantize_rows(x)
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale_row, out_dtype=torch.bfloat16)


def timed_graph(fn, reps: int) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="qwen2.5-7b.json")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--layers", type=int, default=0, help="0: the model's")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = json.load(open(os.path.join(os.path.dirname(HERE), "configs", "models", args.model_config)))
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or hidden // heads
    layers = args.layers or cfg["num_hidden_layers"]
    shapes = [(hd * (heads + 2 * kvh), hidden), (hidden, hd * heads), (2 * inter, hidden), (hidden, inter)]
    torch.manual_seed(0)
    bf16 = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(layers)]
    fp8 = []
    for layer in bf16:
        qs = []
        for w in layer:
            q, s = quantize_rows(w)
            qs.append((q, s.view(1, -1).contiguous()))
        fp8.append(qs)
    weight_bytes_bf16 = sum(2 * n * k for n, k in shapes) * layers
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev),
            "has_F.scaled_mm": hasattr(F, "scaled_mm"), "layers": layers, "shapes": shapes}
    print(info)
    rows = []
    for m in [int(b) for b in args.batches.split(",")]:
        xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _, k in shapes]
        xq = [quantize_rows(x) for x in xs]
        row = {"batch": m}

        def chain_bf16():
            for layer in bf16:
                for x, w in zip(xs, layer):
                    F.linear(x, w)

        def chain_fp8():
            for layer in fp8:
                for x, (q, s) in zip(xs, layer):
                    fp8_linear(x, q, s)

        def chain_fp8_gemm_only():
            for layer in fp8:
                for (x_q, x_s), (q, s) in zip(xq, layer):
                    torch._scaled_mm(x_q, q.t(), scale_a=x_s, scale_b=s, out_dtype=torch.bfloat16)

        def chain_quant_only():
            for layer in fp8:
                for x in xs:
                    quantize_rows(x)

        def chain_ours():
            for layer in fp8:
                for x, (q, s) in zip(xs, layer):
                    fp8_linear_scaled_mm(x, q, s[0])

        def chain_fused_quant_only():
            for layer in fp8:
                for x in xs:
                    quantize_per_token(x)

        def chain_linear():
            for layer in fp8:
                for x, (q, s) in zip(xs, layer):
                    linear(x, q, None, s[0])

        row["linear_routes"] = sorted({route(m, n, k, torch.float8_e4m3fn, dev, True) for n, k in shapes})
        for name, fn in (("bf16_ms", chain_bf16), ("fp8_ms", chain_fp8), ("fp8_gemm_only_ms", chain_fp8_gemm_only),
                         ("quant_only_ms", chain_quant_only), ("ours_ms", chain_ours),
                         ("fused_quant_only_ms", chain_fused_quant_only), ("linear_ms", chain_linear)):
            try:
                row[name] = timed_graph(fn, args.reps)
            except Exception as e:  # a shape _scaled_mm refuses: record it, go on
                row[name] = None
                row[name.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e)[:300]}"
        if row["bf16_ms"]:
            row["bf16_TBps"] = weight_bytes_bf16 / row["bf16_ms"] / 1e9
        if row.get("fp8_gemm_only_ms"):
            row["fp8_gemm_TBps"] = weight_bytes_bf16 / 2 / row["fp8_gemm_only_ms"] / 1e9
        if row.get("fp8_ms") and row["bf16_ms"]:
            row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
        if row.get("linear_ms") and row["bf16_ms"]:
            row["linear_speedup"] = row["bf16_ms"] / row["linear_ms"]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    # Accuracy of one fp8 linear against bf16 and float32 (relative Frobenius error).
    x = torch.randn(64, shapes[0][1], device=dev, dtype=torch.bfloat16)
    w = bf16[0][0]
    ref = F.linear(x.float(), w.float())
    q, s = fp8[0][0]
    err = {"fp8_rel_err": ((fp8_linear(x, q, s).float() - ref).norm() / ref.norm()).item(),
           "bf16_rel_err": ((F.linear(x, w).float() - ref).norm() / ref.norm()).item()}
    print(err)
    print(f"\n{'batch':>6}{'bf16 ms':>10}{'fp8 ms':>10}{'gemm ms':>10}{'quant ms':>10}{'bf16 TB/s':>11}"
          f"{'fp8 TB/s':>10}{'speedup':>9}{'ours ms':>10}{'fused q':>9}{'linear':>9}{'lin x':>7}  routes")
    for r in rows:
        def f(k, w=10, p=3):
            v = r.get(k)
            return f"{v:>{w}.{p}f}" if isinstance(v, float) else f"{'-':>{w}}"
        print(f"{r['batch']:>6}{f('bf16_ms')}{f('fp8_ms')}{f('fp8_gemm_only_ms')}{f('quant_only_ms')}"
              f"{f('bf16_TBps', 11, 2)}{f('fp8_gemm_TBps', 10, 2)}{f('speedup', 9, 2)}{f('ours_ms')}"
              f"{f('fused_quant_only_ms', 9)}{f('linear_ms', 9)}{f('linear_speedup', 7, 2)}  "
              f"{','.join(r['linear_routes'])}")
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"fp8_gemm-{datetime.date.today().isoformat()}-{info['device'].replace(' ', '_')}.json"
    with open(os.path.join(args.results_dir, name), "w") as fh:
        json.dump({**info, "rows": rows, "accuracy": err, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": "python bench/fp8_gemm.py " + " ".join(sys.argv[1:] if argv is None else argv)},
                  fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
