"""One request's state inside the engine: its tokens, its KV blocks, its progress."""
from __future__ import annotations

import enum
from typing import Any, Optional

from ..sampling_params import SamplingParams, sample_seed
from .outputs import RequestTimings, TokenLogprob

# Placeholder in ``Sequence.token_ids`` for a token the GPU is still sampling.
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request as the scheduler sees it.

    ``token_ids`` holds prompt then output tokens. ``num_computed_tokens`` of
    them have their K/V in the cache; the scheduler hands out the rest in
    chunks. After a preemption the count drops to 0 and the whole sequence
    (prompt and output so far) is prefilled again.

    A request with ``params.n`` > 1 starts as one sequence (sample 0) that
    carries ``num_forks`` = n - 1 until its prompt is computed; then the
    scheduler forks the other samples off it (``fork``), sharing its blocks.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks in block_table (prefix caching)
        # Chained hashes of the full blocks of token_ids before the last token, computed once: those
        # tokens never change (only the last one can be a PENDING placeholder).
        self.hash_chain: list[int] = []
        self.computing_hashes: list[int] = []  # prefix blocks this sequence computes for the cache's first time
        self.timings = RequestTimings(arrival=arrival)
        self.num_preemptions = 0
        self.skipped_steps = 0  # consecutive steps passed over by sjf-align
        self.finish_reason: Optional[str] = None
        self.stop_reason: Any = None
        self.error: Optional[str] = None
        self.logprobs: Optional[list[TokenLogprob]] = [] if params.logprobs is not None else None
        # Set by the engine: incremental detokenizer (streaming/stop strings only), streaming flag.
        self.detokenizer = None
        self.stream = False
        self.new_text = ""  # text delta of the latest token (streaming)
        # Overlapped steps: the last token may be PENDING (being sampled on the
        # GPU) at row ``pending_row`` of the step in flight; ``finishing`` marks a
        # sequence whose pending token is its last (length limit), so it is not
        # scheduled again.
        self.pending_row = -1
        self.finishing = False
        self.sample_index = 0
        self.num_forks = params.n - 1  # samples still to fork off this one when its prompt completes
        # Structured output: the engine's structured.SequenceGrammar (a matcher over the accepted
        # output tokens), or None. A forked sample takes ``parent.grammar.fork()``.
        self.grammar = None

    def fork(self, sample_index: int) -> "Sequence":
        """Sample ``sample_index`` of this request: the prompt alone, its own seed, no blocks yet.

        Its params are those of an n=1 request seeded ``sample_seed(seed, j)``,
        so it samples exactly as that request would.
        """
        p = self.params
        params = p.replace(n=1, seed=sample_seed(p.seed, sample_index) if p.seed is not None else None)
        child = Sequence(self.request_id, self.prompt_token_ids, params, self.timings.arrival)
        child.sample_index = sample_index
        child.stream = self.stream
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        return child

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
