"""Where a kernel's warps wait, by SASS instruction: a summary of Nsight Compute's source page.

    ncu --kernel-name regex:_decode_v2_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SourceCounters --export /tmp/rep python bench/decode_attention.py --cases wnano --dtypes fp8 \\
        --configs v2-f8mma-lt-vtail-waves --reps 1
    ncu --import /tmp/rep.ncu-rep --page source --csv --print-source sass > /tmp/src.csv
    python bench/ncu_stalls.py /tmp/src.csv

Prints the stall reasons' shares of all warp samples, the code split into runs executed about as often as the
hottest instruction (the main loop) or less (once per program: prologue, a masked last tile, epilogue) with each
run's share, and the instructions with the most samples. Used on the H200 on 2026-12-04 (seventh session): the
fp8 decode kernel's masked last tile held ~17% of its samples (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def load(path: str):
    rows = list(csv.reader(open(path, newline="")))
    header = next(r for r in rows if SAMPLES in r)
    data = [r for r in rows[rows.index(header) + 1:] if len(r) == len(header)]
    return {h: i for i, h in enumerate(header)}, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    col, data = load(args.csv)
    samples = [int(r[col[SAMPLES]] or 0) for r in data]
    executed = [int(r[col["Instructions Executed"]] or 0) for r in data]
    total = sum(samples) or 1
    reasons = [h for h in col if h.startswith("stall_") and "Not Issued" not in h]
    by_reason = collections.Counter({h[6:]: sum(int(r[col[h]] or 0) for r in data) for h in reasons})
    print(f"{len(data)} instructions, {total} samples; by reason: "
          + ", ".join(f"{k} {v / total:.1%}" for k, v in by_reason.most_common(10)))
    hottest = max(executed)
    runs = []  # [kind, first, last, samples]
    for i, (e, s) in enumerate(zip(executed, samples)):
        kind = "loop" if e >= hottest / 2 else ("rest" if e else "never")
        if runs and runs[-1][0] == kind:
            runs[-1][2], runs[-1][3] = i, runs[-1][3] + s
        else:
            runs.append([kind, i, i, s])
    print("runs of code (loop: executed >= half as often as the hottest instruction):")
    for kind, a, b, s in runs:
        if s / total >= 0.005:
            print(f"  {kind:5s} #{a:4d}-#{b:4d} ({b - a + 1:4d} instructions) {s / total:6.1%}")
    print(f"top {args.top} instructions:")
    order = sorted(range(len(data)), key=lambda i: -samples[i])[:args.top]
    for i in order:
        src = " ".join(data[i][col["Source"]].split())[:64]
        top = max(reasons, key=lambda h: int(data[i][col[h]] or 0))
        print(f"  {samples[i] / total:5.1%} #{i:4d} {src:64s} mostly {top[6:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
