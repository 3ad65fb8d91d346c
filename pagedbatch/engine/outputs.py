"""What the engine hands back for each request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RequestTimings:
    """Wall-clock instants (time.perf_counter seconds) of one request's life."""

    arrival: float
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None

    @property
    def queue_s(self) -> Optional[float]:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency_s(self) -> Optional[float]:
        return None if self.finished is None else self.finished - self.arrival


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # The most likely alternatives (token id, logprob), best first, when asked for.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A request's state after a step, or its final result when ``finished``.

    ``new_token_ids``/``new_text`` hold what this step added (for streaming);
    ``token_ids``/``text`` hold everything so far. ``finish_reason`` is
    "stop" (EOS, stop token or stop string), "length" (max_tokens or the
    model's length limit), "abort" or "error" (then ``error`` says why).
    A request with ``n`` > 1 gives outputs for each of its samples, told
    apart by ``sample_index`` (0..n-1).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str]
    timings: RequestTimings
    error: Optional[str] = None
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    logprobs: Optional[list[TokenLogprob]] = None
    num_preemptions: int = 0
    sample_index: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tpot_s(self) -> Optional[float]:
        """Mean time per output token after the first."""
        t = self.timings
        if t.first_token is None or t.finished is None or len(self.token_ids) < 2:
            return None
        return (t.finished - t.first_token) / (len(self.token_ids) - 1)
