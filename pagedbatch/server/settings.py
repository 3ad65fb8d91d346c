"""The HTTP server's own settings (the engine's are in EngineConfig)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerSettings:
    """``model_name`` is what clients pass as "model" (``aliases`` are accepted too);
    ``max_tokens_cap`` bounds max_tokens per request (None: the model's maximum length)."""

    model_name: str
    aliases: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_cap: Optional[int] = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError("model_name must be a non-empty string")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if self.max_tokens_cap is not None and (not isinstance(self.max_tokens_cap, int) or self.max_tokens_cap < 1):
            raise ValueError(f"max_tokens_cap must be a positive integer, got {self.max_tokens_cap!r}")
        self.aliases = tuple(self.aliases)
