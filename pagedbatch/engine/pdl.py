"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A single-stream decode step of a 7B model is ~250 kernels in a CUDA graph;
between two of them the GPU drains the first grid, then launches and ramps
up the next, a microsecond or two in which no weight byte moves. With PDL a
kernel may be launched while its predecessor still runs: its programs become
resident, load what does not depend on the predecessor (the weights of a
linear layer, which never change), then wait in ``griddepcontrol.wait``
until the predecessor has finished and its writes are visible.

A PDL kernel takes ``PDL: tl.constexpr = False`` and is launched with
``kernel[grid](..., **launch_kwargs(device))``. The rules each one follows:
  * before ``wait_for_producer(PDL)`` it reads only constants (weights,
    tables built at load time) and writes nothing;
  * it lets its own dependents launch only after that wait, so when a
    kernel's programs run, every kernel before its immediate predecessor has
    completed (each of them returned from its own wait first), and the
    look-ahead is one kernel deep. Small kernels release right after the
    wait; the skinny GEMM only after its main loop (releasing early made the
    bf16 decode chain 12% slower: skinny_gemm.py says how it was measured).
Kernels launched without PDL (torch's, cuBLAS, NCCL) keep plain stream order
on both sides, and ``griddepcontrol`` is a no-op in a kernel launched
without the attribute, so mixing is safe. CUDA-graph capture records the
launches as programmatic edges (CUDA 12.3+).
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: PDL is off
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without grid dependency control: PDL is off
    gdc_wait = None

# The lead's switch (like linear.USE_SKINNY_BF16): results do not depend on it, only timing.
# bench/throughput.py --no-pdl turns it off for an A/B run; set it before the engine is built.
USE_PDL = True


def enabled(device) -> bool:
    """Whether our kernels on ``device`` are launched with PDL: a CUDA GPU of compute capability 9.0+,
    Triton with grid dependency control, not the interpreter, and ``USE_PDL``."""
    return USE_PDL and _supported(torch.device(device))


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    if gdc_wait is None or device.type != "cuda" or torch.version.hip is not None or _interpreted():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _interpreted() -> bool:
    # TRITON_INTERPRET=1 (even with CUDA tensors) runs kernels in Python, which has no griddepcontrol.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(wait_for_producer, InterpretedFunction)


def launch_kwargs(device) -> dict:
    """A PDL kernel's extra launch arguments on ``device``: its ``PDL`` constexpr and Triton's ``launch_pdl``
    where PDL is on, none elsewhere (the kernels' ``PDL`` defaults to False)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {}


if triton is not None:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr, RELEASE: tl.constexpr = True):
        """Wait until the previous kernel has finished (its writes visible); with RELEASE, then let the next
        one launch (else the kernel calls ``release_dependents`` itself, later)."""
        if PDL:  # never true without gdc_wait (see _supported)
            gdc_wait()
            if RELEASE:
                gdc_launch_dependents()

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """Let the next kernel launch (only after ``wait_for_producer``)."""
        if PDL:
            gdc_launch_dependents()
