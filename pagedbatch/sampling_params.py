"""Per-request sampling settings, validated at construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .structured_output import StructuredOutputParams

_INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs")
_M64 = (1 << 64) - 1


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a request seeded ``seed`` (``n`` > 1).

    Sample 0 keeps ``seed``, so n=1 is unchanged; sample j > 0 gets a
    non-negative 63-bit value mixed from (seed, j) (splitmix64 finaliser), so
    neighbouring seeds and indices give unrelated streams and a rerun of a
    request reproduces every sample.
    """
    if sample_index == 0:
        return seed
    x = (seed * 0x9E3779B97F4A7C15 + sample_index * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mul) & _M64
    return (x ^ (x >> 31)) >> 1


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. ``top_k`` 0 or -1 disables top-k. ``seed``
    makes sampling reproducible per request: the same seed and prompt give the
    same tokens whatever else is in the batch. ``logprobs`` = N returns the
    chosen token's log-probability and the N most likely alternatives (0: the
    chosen token only; None: nothing). Log-probabilities are those of the
    model's raw distribution, before temperature, penalties and truncation.

    ``n`` > 1 asks for n samples of the same prompt: the engine computes the
    prompt once, shares its KV blocks, and returns n outputs with
    ``sample_index`` 0..n-1; sample j of a seeded request samples as an n=1
    request with ``seed=sample_seed(seed, j)`` would.

    Penalties follow the usual conventions: ``repetition_penalty`` (>1
    discourages, as in Hugging Face, applied over prompt and output tokens);
    ``presence_penalty`` and ``frequency_penalty`` (OpenAI, over output tokens).

    ``structured_output`` (a ``StructuredOutputParams`` or a dict such as
    ``{"json": schema}``, ``{"regex": r"..."}``, ``{"choice": [...]}``)
    constrains the text to a JSON schema, regex, choice list or grammar; the
    request stops ("stop") where the grammar ends, or at max_tokens
    ("length", then the text may be incomplete). It cannot be combined with
    ``min_tokens`` > 0 or with ``stop`` strings (the grammar decides where the
    text may end; a stop string would cut it short of matching).
    """

    max_tokens: int = 256
    min_tokens: int = 0  # before this many output tokens no EOS, stop token id or stop string ends the request
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    n: int = 1  # samples of the prompt (last, so positional use of the fields above is unchanged)
    structured_output: Optional[StructuredOutputParams] = None

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("seed", "logprobs"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):  # NaN passes every range check below (a NaN temperature sampled token 0)
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (the number of samples of the prompt), got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a non-negative 63-bit integer, got {self.seed}")
        if isinstance(self.structured_output, dict):
            self.structured_output = StructuredOutputParams.from_dict(self.structured_output)
        elif self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputParams):
            raise ValueError(f"structured_output must be a StructuredOutputParams or a dict such as "
                             f"{{'json': schema}}, got {type(self.structured_output).__name__}")
        if self.structured_output is not None and self.min_tokens > 0:
            raise ValueError(f"structured_output cannot be combined with min_tokens ({self.min_tokens}): the grammar "
                             "decides where the output may end")
        if self.structured_output is not None and self.stop:
            # A stop string would cut the constrained text where the grammar has not ended (half a JSON object)
            # and report it as a normal "stop"; the grammar ends the text itself.
            raise ValueError(f"structured_output cannot be combined with stop strings ({self.stop!r}): a stop string "
                             "would cut the text before the grammar ends, so it would no longer match; the grammar "
                             "ends the output itself (stop_token_ids may be given)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


SamplingParamsLike = Union[SamplingParams, dict, None]
