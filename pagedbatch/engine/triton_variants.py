"""How many variants of our Triton kernels this process has compiled (or loaded from Triton's disk cache).

Triton compiles one variant per combination of constexpr values and per
specialization of integer and pointer arguments (divisible by 16, equal to 1,
16-byte aligned). A variant first needed in the middle of a job stalls that
step for the compile (~0.3-1 s on the H200): ``bench/profile_steps.py`` counts
the variants before and after its timed run, and the GPU tests pin that a
warmed-up engine compiles nothing new as its batch changes.
"""
from __future__ import annotations

import importlib

_MODULES = (
    "pagedbatch.engine.attention.triton_kernels",
    "pagedbatch.engine.attention.triton_decode",
    "pagedbatch.engine.attention.triton_paged",
    "pagedbatch.engine.models.fused_ops",
    "pagedbatch.engine.models.fp8",
    "pagedbatch.engine.models.skinny_gemm",
    "pagedbatch.engine.models.mid_gemm",
    "pagedbatch.engine.sampling_kernels",
)


def our_kernels() -> dict:
    """name -> JITFunction for every Triton kernel (and helper) defined in our kernel modules."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                found[f"{name.rsplit('.', 1)[-1]}.{attr}"] = obj
    return found


def compiled_variants(fn) -> int:
    """Variants of one JITFunction held in this process, over all devices."""
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        raise RuntimeError("this Triton version keeps compiled kernels where triton_variants does not look "
                           "(JITFunction.device_caches)")
    return sum(len(entry[0]) for entry in caches.values())


def variant_counts() -> dict[str, int]:
    """Kernel name -> compiled variants, for the kernels that have any."""
    counts = {name: compiled_variants(fn) for name, fn in our_kernels().items()}
    return {name: n for name, n in counts.items() if n}
