"""Continuous batching with a per-step token budget (the vLLM v1 rule).

There are no prefill and decode phases: every sequence has
``num_tokens`` and ``num_computed_tokens``, and each step hands out up to
``max_num_batched_tokens`` new tokens. A decode is a sequence one token
behind; a prefill (or a chunk of one) is a sequence many tokens behind.
When the KV cache runs out, the lowest-priority running sequence (the most
recently arrived) is preempted: its blocks are freed and it is recomputed
later from its prompt and the tokens it had produced.

Policies decide the order in which running sequences get the budget:
``fcfs`` takes them by arrival; ``sjf-align`` runs only the decoding
sequences of the shortest current length (so equal-length sequences advance
together) plus any passed over for ``sjf_max_skipped_steps`` steps in a row.

``n`` samples of a prompt: the request is admitted as one sequence, and
only when ``running`` has room for all n (the samples still to come hold
their places). In the step whose plan completes its prompt the other n - 1
are forked off it: they share its blocks (``BlockManager.fork``), join
``running``, and sample their first token from its logits row
(``SchedulerOutput.forks``). From then on each is a sequence like any
other; a preempted one is recomputed from the prompt and its own tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import EngineConfig
from .block_manager import BlockManager
from .sequence import PENDING, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The step plan handed to the model runner."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (index in ``seqs`` of a sequence whose prompt this step completes, a sample forked off it): the
    # fork samples its first token from that sequence's logits row.
    forks: list[tuple[int, Sequence]] = field(default_factory=list)
    # (source, destination) KV blocks to copy before the forward pass (copy-on-write after a fork).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class BatchStats:
    """How well the policy aligns decode lengths (reported by the job runner)."""

    steps: int = 0
    decode_steps: int = 0  # steps with at least one decode row
    padding_free_decode_steps: int = 0  # decode rows all shared one length
    decode_length_spread_sum: int = 0  # sum over decode steps of max - min length
    decode_rows: int = 0
    prefill_tokens: int = 0
    preemptions: int = 0
    forked_seqs: int = 0  # samples forked off a computed prompt instead of computing it again

    def as_dict(self) -> dict:
        d = self.decode_steps
        return {
            "steps": self.steps,
            "decode_steps": d,
            "mean_decode_batch": self.decode_rows / d if d else 0.0,
            "padding_free_fraction": self.padding_free_decode_steps / d if d else 0.0,
            "mean_length_spread": self.decode_length_spread_sum / d if d else 0.0,
            "prefill_tokens": self.prefill_tokens,
            "preemptions": self.preemptions,
            "forked_seqs": self.forked_seqs,
        }


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival (priority) order
        self._reserved = 0  # places in running held for samples not forked yet (sum of running num_forks)
        self.stats = BatchStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the step plan -------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        budget = self._schedule_running(self._running_in_policy_order(), out, budget)
        if not out.seqs and self.running:
            # The policy's choice could not run (e.g. sjf-align picked a
            # sequence that had to preempt itself): fall back to arrival order.
            budget = self._schedule_running(list(self.running), out, budget)

        # Admit waiting sequences, oldest (or just preempted) first, but not
        # in a step that had to preempt: the cache is already short. One whose
        # prompt continues into blocks a running sequence is computing waits
        # until they are cached (then it reuses them); younger ones go first.
        i, held = 0, 0
        max_seqs = self.config.max_num_seqs
        while (i < len(self.waiting) and budget > 0 and not (out.preempted and out.seqs)
               and len(self.running) + self._reserved < max_seqs):
            seq = self.waiting[i]
            if len(self.running) + self._reserved + 1 + seq.num_forks > max_seqs:
                break  # its n samples do not fit yet: it keeps its turn
            if seq.token_ids[-1] == PENDING:
                # Preempted this very step while its newest token is still being sampled (a sample
                # forked last step can be): it is recomputed once that token is known.
                i += 1
                continue
            if self.block_manager.waits_for_computing_prefix(seq):
                i, held = i + 1, held + 1
                if held >= self.config.max_num_seqs:
                    break  # bounds the scan of a long queue of waiting rows
                continue
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, n):
                self.block_manager.free(seq)  # give back the prefix hits; retried next step
                break
            self.block_manager.record_admission(seq)
            self.block_manager.note_computing(seq)
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self._insert_running(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n

        if self._reserved:
            for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
                if seq.num_forks and seq.num_computed_tokens + n == seq.num_tokens:
                    self._fork(seq, i, out)
        out.block_copies = self.block_manager.take_copies()
        self._record(out)
        return out

    def _fork(self, parent: Sequence, index: int, out: SchedulerOutput) -> None:
        """Fork the other samples off ``parent``, whose prompt this plan completes."""
        for j in range(1, parent.num_forks + 1):
            child = parent.fork(j)
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = parent.num_tokens  # the prompt, once this step has run
            child.status = SequenceStatus.RUNNING
            self._insert_running(child)
            out.forks.append((index, child))
        self.stats.forked_seqs += parent.num_forks
        self._reserved -= parent.num_forks
        parent.num_forks = 0

    def _schedule_running(self, order: list[Sequence], out: SchedulerOutput, budget: int) -> int:
        scheduled = {id(s) for s in out.seqs}
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or id(seq) in scheduled or seq.finishing:
                continue  # preempted earlier in this loop, already planned, or its last token is in flight
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, n):
                victim = self._pick_victim(exclude=scheduled)
                if id(victim) in scheduled:
                    budget += out.num_new_tokens[out.seqs.index(victim)]
                    scheduled.discard(id(victim))
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n
        return budget

    def _running_in_policy_order(self) -> list[Sequence]:
        if self.config.scheduling_policy == "fcfs" or not self.running:
            return list(self.running)
        # sjf-align: prefill work first (it admits new requests), then the
        # decoders at the shortest length, then the starved ones.
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        if not decoding:
            return prefilling
        shortest = min(s.num_tokens for s in decoding)
        bound = self.config.sjf_max_skipped_steps
        chosen = []
        for s in decoding:
            if s.num_tokens == shortest or s.skipped_steps >= bound:
                s.skipped_steps = 0
                chosen.append(s)
            else:
                s.skipped_steps += 1
        return prefilling + chosen

    def _pick_victim(self, exclude: set[int]) -> Sequence:
        # Lowest priority = latest arrival; prefer one not yet given work this step.
        for seq in reversed(self.running):
            if id(seq) not in exclude:
                return seq
        return self.running[-1]

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        for i, s in enumerate(out.seqs):
            if s is seq:  # its work this step is void
                del out.seqs[i], out.num_new_tokens[i]
                break
        self._remove_running(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.skipped_steps = 0
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.stats.preemptions += 1

    def _insert_running(self, seq: Sequence) -> None:
        # Keep arrival order so preemption always picks the newest; a
        # re-admitted preempted sequence goes back to its place.
        t = seq.timings.arrival
        i = len(self.running)
        while i > 0 and self.running[i - 1].timings.arrival > t:
            i -= 1
        self.running.insert(i, seq)
        self._reserved += seq.num_forks

    def _remove_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._reserved -= seq.num_forks

    def _record(self, out: SchedulerOutput) -> None:
        if out.is_empty():
            return
        st = self.stats
        st.steps += 1
        lengths = []
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens and seq.num_output_tokens > 0:
                lengths.append(seq.num_tokens)
            else:
                st.prefill_tokens += n
        if lengths:
            st.decode_steps += 1
            st.decode_rows += len(lengths)
            spread = max(lengths) - min(lengths)
            st.decode_length_spread_sum += spread
            st.padding_free_decode_steps += spread == 0

    # -- after the step --------------------------------------------------

    def advance(self, plan: SchedulerOutput) -> None:
        """Mark the planned tokens computed once the step is launched (the next plan builds on them)."""
        for seq, n in zip(plan.seqs, plan.num_new_tokens):
            seq.num_computed_tokens += n

    def cache_blocks(self, plan: SchedulerOutput) -> None:
        """Offer the blocks a finished step filled to the prefix cache.

        Called when the step's tokens are known: a block is hashed by its
        token ids, and the newest of them may have been pending until then.
        """
        self.block_manager.cache_filled_blocks(s for s in plan.seqs if s.status is SequenceStatus.RUNNING)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self._remove_running(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
