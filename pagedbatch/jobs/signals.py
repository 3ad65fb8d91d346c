"""SIGTERM / SIGINT: ask the job loop to stop at the next step boundary.

Slurm preemption sends SIGTERM and, after a grace period, SIGKILL; Ctrl-C
sends SIGINT. The first signal sets a flag the loop polls (so the finished
rows get committed); a second SIGINT raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional


class StopRequest:
    """Context manager installing the handlers; ``signum`` is set once a stop was asked for."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print(f"\n[pagedbatch] {signal.Signals(signum).name} received: stopping admission, committing "
                  "finished rows (send SIGINT again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
