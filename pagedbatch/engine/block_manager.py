"""Reference-counted allocator of KV-cache blocks, with prefix caching.

Pure Python over ints: a block is an index into the per-layer cache tensors
that the model runner owns. A sequence's ``block_table`` lists its blocks in
order; token ``p`` lives in ``block_table[p // block_size]``.

Prefix caching: every full block is identified by a chained hash of (the
previous block's hash, the block's token ids). A new sequence whose prompt
starts with cached blocks takes them (reference count + 1) instead of
recomputing them. Freed blocks keep their hash and sit in an LRU free list,
so a prefix stays reusable until its memory is needed for something else.
Hits are verified against the stored token ids, so a hash collision can
never serve wrong K/V.

In-flight prefixes: a block that a running sequence is computing for the
first time is recorded by its hash until it is cached. A waiting sequence
whose prompt continues into such a block is held back by the scheduler
(``waits_for_computing_prefix``): admitted in the same step it would compute
the same K/V again instead of reusing it one step later. This is what makes
rows that share a few-shot prefix cheap even when they arrive together.

Forks (``n`` samples of one prompt): ``fork`` gives a new sequence the
whole block table of another, every block's reference count + 1, the
partly filled last block included. A sequence about to write into a block
that others still hold (only ever that last block) gets a fresh copy of it
(copy-on-write, ``allocate``); the last holder writes in place. The copies
are queued as (source, destination) block ids for the model runner, which
makes them on the device before the step's forward pass.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order (front = evicted first). An OrderedDict
        # because a cache hit takes a block out of the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._block_key: list[Optional[tuple[int, tuple[int, ...]]]] = [None] * num_blocks
        self._block_hash: list[Optional[int]] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._computing: dict[int, str] = {}  # block hash -> request id of the running sequence computing it
        # Copy-on-write copies planned this step: destination block -> source block.
        self._copies: dict[int, int] = {}
        self.num_cow_copies = 0
        self.peak_used_blocks = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    # -- prefix cache ----------------------------------------------------

    def _chain(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of ``seq``'s first ``num_blocks`` full blocks (memoised on the sequence)."""
        chain, bs = seq.hash_chain, self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            chain.append(hash((chain[-1] if chain else 0, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        return chain

    def _key(self, seq: Sequence, i: int) -> tuple[int, tuple[int, ...]]:
        bs = self.block_size
        return (seq.hash_chain[i - 1] if i else 0, tuple(seq.token_ids[i * bs : (i + 1) * bs]))

    def _is_cached(self, seq: Sequence, i: int) -> Optional[int]:
        block = self._cached.get(seq.hash_chain[i])
        return block if block is not None and self._block_key[block] == self._key(seq, i) else None

    def waits_for_computing_prefix(self, seq: Sequence) -> bool:
        """True if the first uncached full block of ``seq``'s prompt is being computed by a running sequence."""
        if not self._computing:
            return False
        # Hash lookups alone: this only decides whether to wait a step (match_prefix verifies every hit),
        # and it runs for each held row at every step.
        for h in self._chain(seq, (seq.num_tokens - 1) // self.block_size):
            if h not in self._cached:
                owner = self._computing.get(h)
                return owner is not None and owner != seq.request_id
        return False

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its prefix; returns tokens reused.

        At least one token is always left to compute, so the step that
        admits the sequence still produces its next-token logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        hits = 0
        for i, h in enumerate(self._chain(seq, (seq.num_tokens - 1) // bs)):
            block = self._is_cached(seq, i)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            hits += 1
        seq.num_computed_tokens = hits * bs
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return hits * bs

    def note_computing(self, seq: Sequence) -> None:
        """Record the full prompt blocks an admitted sequence is about to compute that no one else has."""
        if not self.enable_prefix_caching:
            return
        chain = self._chain(seq, (seq.num_tokens - 1) // self.block_size)
        for h in chain[len(seq.block_hashes):]:
            if h not in self._cached and h not in self._computing:
                self._computing[h] = seq.request_id
                seq.computing_hashes.append(h)

    def record_admission(self, seq: Sequence) -> None:
        """Count a first admission's prompt tokens and how many came from the cache."""
        if seq.num_preemptions == 0:
            self.queried_tokens += seq.num_prompt_tokens
            self.hit_tokens += min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def cache_filled_blocks(self, seqs) -> None:
        """``cache_full_blocks`` for those of ``seqs`` that have filled a block since (most steps, none has)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for seq in seqs:
            if min(seq.num_computed_tokens // bs, len(seq.block_table)) > len(seq.block_hashes):
                self.cache_full_blocks(seq)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks a step has just filled (call after num_computed_tokens moves)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            h = self._chain(seq, i + 1)[i]
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if self._computing.get(h) == seq.request_id:
                del self._computing[h]
            if h not in self._cached and self._block_hash[block] is None:
                self._cached[h] = block
                self._block_hash[block] = h
                self._block_key[block] = self._key(seq, i)

    # -- allocation --------------------------------------------------------

    def _shared_write_block(self, seq: Sequence, num_new_tokens: int) -> int:
        """Index in ``seq.block_table`` of a block the next tokens would write into while others hold it, or -1."""
        i = seq.num_computed_tokens // self.block_size
        if num_new_tokens > 0 and i < len(seq.block_table) and self.ref_counts[seq.block_table[i]] > 1:
            return i
        return -1

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (and no change) if blocks run out.

        Copy-on-write: if the first of them lands in a block shared with a
        fork, ``seq`` swaps it for a fresh block and a copy is queued.
        """
        needed = self.blocks_needed(seq, num_new_tokens)
        cow = self._shared_write_block(seq, num_new_tokens)
        if needed + (cow >= 0) > len(self._free):
            return False
        if cow >= 0:
            src, dst = seq.block_table[cow], self._take_free_block()
            self.ref_counts[src] -= 1  # > 0: the others still hold it
            seq.block_table[cow] = dst
            self._copies[dst] = src
            self.num_cow_copies += 1
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return True

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
        h = self._block_hash[block]
        if h is not None:  # evict its cached prefix: the memory is needed now
            del self._cached[h]
            self._block_hash[block] = self._block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` (no blocks) ``parent``'s blocks; every block's reference count + 1."""
        assert not child.block_table
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.hash_chain = list(parent.hash_chain)

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies planned since the last call, in the order planned."""
        copies, self._copies = [(src, dst) for dst, src in self._copies.items()], {}
        return copies

    def free(self, seq: Sequence) -> None:
        # Freed blocks join the back of the eviction order, tail first, so a
        # shared prefix outlives the suffixes that hang off it.
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                self._copies.pop(block, None)  # a copy into it planned this step is void: it may be reused
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        for h in seq.computing_hashes:  # blocks it had not finished: others must not wait for them
            if self._computing.get(h) == seq.request_id:
                del self._computing[h]
        seq.computing_hashes = []
