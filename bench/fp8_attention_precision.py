"""How precise attention is when its products run on e4m3 operands (the reasoning behind DecodeConfig.fp8_mma).

    python bench/fp8_attention_precision.py          # CPU, a few seconds

One query row of 2 heads against an fp8-rounded K/V (head_dim 128), softmax attention in float32 as the
reference; the query enters the score product as bf16, as one e4m3 term (per-head scale, max -> 448) or as two
(hi + lo, the remainder quantized again), and the probabilities as float32 or one e4m3 term (times 2^8, so the
largest is exact). Prints the max |error| over 20 draws per case; ``temp`` scales the query, sharpening the
attention. Torch's own casts round to nearest even and saturate, as the GPU's do (Triton's interpreter does not).
"""
from __future__ import annotations

import torch

F8 = torch.float8_e4m3fn
LOG2E = 1.4426950408889634


def _e4m3(x):
    return x.to(F8).float()


def attend(q, k, v, scale, q_mode: str, p_mode: str):
    if q_mode == "bf16":
        qq = q.bfloat16().float()
    else:
        s = q.abs().amax(1, keepdim=True).clamp_min(1e-30) / 448
        hi = _e4m3(q / s)
        qq = (hi + (_e4m3(q / s - hi) if q_mode == "e4m3 hi+lo" else 0)) * s
    scores = qq @ k.T * scale
    p = torch.exp2((scores - scores.amax(1, keepdim=True)) * LOG2E)
    l = p.sum(1, keepdim=True)
    if p_mode == "e4m3":
        p = _e4m3(p * 256) / 256
    return (p @ v) / l


def main() -> int:
    torch.manual_seed(0)
    modes = [(q, p) for p in ("fp32", "e4m3") for q in ("bf16", "e4m3", "e4m3 hi+lo")]
    print("keys  temp  " + "  ".join(f"q {q} / p {p}" for q, p in modes))
    for keys, temp in ((4096, 1.0), (64, 1.0), (500, 3.0), (500, 6.0)):
        worst = dict.fromkeys(modes, 0.0)
        for _ in range(20):
            q = torch.randn(2, 128) * temp
            k, v = _e4m3(torch.randn(keys, 128)), _e4m3(torch.randn(keys, 128))
            ref = torch.softmax(q @ k.T * 128**-0.5, 1) @ v
            for mode in modes:
                worst[mode] = max(worst[mode], (attend(q, k, v, 128**-0.5, *mode) - ref).abs().max().item())
        print(f"{keys:5d} {temp:4.1f}  " + "  ".join(f"{worst[m]:.4f}" for m in modes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
