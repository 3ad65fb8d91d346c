"""Is the fp8 cache write's division exact? A CPU check in exact rational arithmetic.

    python bench/fp8_quantize_division.py            # ~1 minute

The rotary + cache-write kernel quantizes x to e4m3 as RN(x / scale), which
must be IEEE division's float32 quotient: one ulp off near an e4m3 rounding
tie stores a different byte than torch's cast. It computes the quotient as
    inv = RN(1 / scale)              (div_rn, once per program)
    q0  = RN(x * inv)
    r   = fma(-q0, scale, x)         (the exact remainder)
    q1  = fma(r, inv, q0)
(Markstein's correction, the fast path of CUDA's own div.rn.f32). This script
evaluates that sequence with every operation rounded exactly once (Python
fractions) and compares q1 with float32 division for: every 7th bf16 value
(the V path's inputs), random float32 values, and values within 3 ulps of
scale times each e4m3 rounding tie, for a dozen scales. Prints the count of
mismatches (0 expected). The CPU test
tests/engine/test_triton_attention.py::test_fp8_cache_write_divides_exactly_as_ieee_near_rounding_ties
runs the kernel's own function in the interpreter on such values.
"""
from __future__ import annotations

import random
import sys
from fractions import Fraction

import numpy as np


def rn32(x: Fraction) -> np.float32:
    """Round a rational to the nearest float32, ties to even (normal range)."""
    f = np.float32(float(x))  # within an ulp; settle between the neighbours exactly
    down, up = np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))

    def key(c):
        return abs(Fraction(float(c)) - x), int(np.array(c, np.float32).view(np.uint32)) & 1

    return min((down, f, up), key=key)


def corrected_quotient(x: np.float32, scale: np.float32) -> np.float32:
    inv = np.float32(1.0) / scale  # IEEE float32 division: RN(1 / scale)
    q0 = np.float32(x * inv)
    r = rn32(Fraction(float(x)) - Fraction(float(q0)) * Fraction(float(scale)))
    return rn32(Fraction(float(r)) * Fraction(float(inv)) + Fraction(float(q0)))


def e4m3_ties() -> list[float]:
    vals = sorted({float(np.float32(m * 2.0 ** e)) for e in range(-9, 9) for m in (1, 1.125, 1.25, 1.375, 1.5,
                                                                                 1.625, 1.75, 1.875)})
    return [(a + b) / 2 for a, b in zip(vals, vals[1:])]


def main() -> int:
    rng = random.Random(0)
    scales = [np.float32(s) for s in (0.03, 0.2, 1.0, 0.0371, 0.05, 3.7e-3, 12.5)]
    scales += [np.float32(rng.uniform(1e-3, 10)) for _ in range(5)]
    xs = []
    for b in range(0, 65536, 7):
        v = np.array(b << 16, np.uint32).view(np.float32)
        if np.isfinite(v) and 1e-30 < abs(v) < 1e30:
            xs.append(np.float32(v))
    xs += [np.float32(rng.uniform(-500, 500)) for _ in range(3000)]
    checked = bad = 0
    for s in scales:
        near = []
        for t in e4m3_ties()[::3]:
            c = np.float32(t * s)
            for k in range(-3, 4):
                v = c
                for _ in range(abs(k)):
                    v = np.nextafter(v, np.float32(np.inf if k > 0 else -np.inf))
                near.append(v)
        for x in xs + near:
            checked += 1
            if corrected_quotient(x, s) != np.float32(x / s):
                bad += 1
                if bad <= 5:
                    print(f"mismatch: x={x!r} scale={s!r}")
    print(f"{checked} quotients checked, {bad} differ from IEEE float32 division")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
