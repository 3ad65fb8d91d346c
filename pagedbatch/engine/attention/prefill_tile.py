"""The paged prefill kernel's tile (``triton_kernels._prefill_kernel``): a plain value, importable without Triton
so that ``EngineConfig`` can check a configured tile on any install."""
from __future__ import annotations

import dataclasses
import re
from typing import Union


@dataclasses.dataclass(frozen=True)
class PrefillTile:
    """The prefill kernel's launch shape: rows of a tile (query tokens x heads of the group), keys per
    iteration, warps and software-pipeline stages. ``str()`` gives the compact form ("bm64 bn64 w4 st2")
    that ``parse``, ``EngineConfig.prefill_attention_config``, ``bench/throughput.py --prefill-config`` and
    ``bench/prefill_attention.py --tiles`` take.

    Why choosable: what runs fastest is a GPU measurement, not a rule. Offline (sm_90, Triton 3.6,
    ``bench/kernel_sass.py --kernel prefill --group 2``) every tile below compiles to Hopper's warpgroup MMA
    without spills except 64x128 with 4 warps (255 registers, 56 B of stack) and 128x64 with 4 warps (320 B):
    64x64/4 warps 198 registers, 2 programs an SM, 412 instructions a 64-key tile (0.40 a score per warp);
    128x64/8 warps 172, 1 an SM; 128x128/8 warps 240, 1 an SM, 607 instructions a 128-key tile (0.30).
    Larger tiles spend fewer instructions a score and reload K/V for fewer query tiles, but waste more of
    their diagonal tiles on short prompts (masked tiles cost ~1.7x an unmasked one).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"PrefillTile.{name} must be a power of two, got {v}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"PrefillTile block_m and block_n must be >= 16 (tensor-core tiles), got {self}")
        if self.num_stages < 1:
            raise ValueError(f"PrefillTile.num_stages must be >= 1, got {self.num_stages}")

    def __str__(self) -> str:
        return f"bm{self.block_m} bn{self.block_n} w{self.num_warps} st{self.num_stages}"

    @classmethod
    def parse(cls, text: Union[str, "PrefillTile"]) -> "PrefillTile":
        """Inverse of ``str()``; a ValueError naming the expected form otherwise."""
        if isinstance(text, PrefillTile):
            return text
        m = re.fullmatch(r"\s*bm(\d+)\s+bn(\d+)\s+w(\d+)\s+st(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"a prefill attention tile is written 'bm<rows> bn<keys> w<warps> st<stages>' "
                             f"(e.g. '{DEFAULT_PREFILL_TILE}'), got {text!r}")
        return cls(*map(int, m.groups()))


# The engine's tile until a GPU sweep (bench/prefill_attention.py --tiles) says otherwise.
DEFAULT_PREFILL_TILE = PrefillTile()
