"""Reference-counted allocator of KV-cache blocks.

Pure Python over ints: a block is an index into the per-layer cache tensors
that the model runner owns. A sequence's ``block_table`` lists its blocks in
order; token ``p`` lives in ``block_table[p // block_size]``.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (and no change) if blocks run out."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return True

    def free(self, seq: Sequence) -> None:
        # Release in reverse so the tail blocks (least likely to be shared) are reused first.
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
