"""Rank 0's deadlines on its tensor-parallel workers: who fell behind, and a watchdog for the waits it cannot time.

The progress board is a few bytes of memory shared by the processes of one
engine (an anonymous file rank 0 creates; each worker inherits its
descriptor). Each rank keeps three numbers there: how many host (gloo)
collectives it has entered -- every one on the CPU; the step headers and
setup exchanges on GPUs, where NCCL's never block the host -- how many of
them it has finished waiting for, and a heartbeat that a thread of its own
refreshes ten times a second. Every rank issues the same collectives in the
same order, so when rank 0 has waited too long on its k-th, the ranks to
blame are those that are not running at all (an old heartbeat: SIGSTOP, a
debugger, a frozen container) and those that never got to the k-th and are
not waiting in an earlier one either (busy or blocked in their own code: a
deadlock, a GPU sync that never returns). A rank that is behind but waiting
in a collective is waiting on someone else (gloo's broadcast is a tree:
rank 3 receives through rank 1): it is named only when no rank is to blame.

Rank 0's own waits carry deadlines (a gloo wait with a timeout, a polled
CUDA event), but with NCCL its host can also block where no deadline can be
given: a kernel launch once the GPU's queue is full behind a collective that
never completes, or NCCL's communicator setup. The watchdog covers those:
while the main thread is inside a span that depends on the workers, a
thread checks that it keeps coming back to the group, and after the timeout
(plus a margin that lets the precise deadlines fire first) it fails the
group. Failing kills the workers and aborts the groups, which unblocks the
main thread; its next call into the group raises the error.
"""
from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Optional

log = logging.getLogger(__name__)

_SLOTS = 3  # per rank: collectives entered, finished, last heartbeat (CLOCK_MONOTONIC ns: one clock for all)
_BEAT_S = 0.1
_STALE_S = 1.0  # ten missed heartbeats: the process is not running


class ProgressBoard:
    """Per rank: the collectives it has entered and finished, and its heartbeat, in memory all ranks map."""

    def __init__(self, size: int, fd: Optional[int] = None):
        """Rank 0 creates the board (``fd`` None); a worker maps the descriptor it inherited."""
        if fd is None:
            fd = _anonymous_file(8 * _SLOTS * size)
        self.fd = fd  # rank 0 hands it to each worker, then closes it: the mapping stays
        self.size = size
        self._slots = memoryview(mmap.mmap(fd, 8 * _SLOTS * size)).cast("q")

    def entered(self, rank: int, count: int) -> None:
        self._slots[_SLOTS * rank] = count

    def finished(self, rank: int, count: int) -> None:
        self._slots[_SLOTS * rank + 1] = count

    def beat(self, rank: int) -> None:
        self._slots[_SLOTS * rank + 2] = time.monotonic_ns()

    def start_heartbeat(self, rank: int) -> None:
        """A worker: beat from a thread of its own for as long as the process runs."""
        def beat() -> None:
            while True:
                self.beat(rank)
                time.sleep(_BEAT_S)

        self.beat(rank)
        threading.Thread(target=beat, name="pagedbatch-tp-heartbeat", daemon=True).start()

    def laggards(self, target: int) -> dict[int, str]:
        """The workers that keep rank 0's ``target``-th collective from completing: rank -> why.

        Empty when every worker reached it and is running.
        """
        now = time.monotonic_ns()
        blamed, waiting = {}, {}
        for rank in range(1, self.size):
            entered, finished, beat = self._slots[_SLOTS * rank : _SLOTS * (rank + 1)]
            if beat and (now - beat) / 1e9 > _STALE_S:
                blamed[rank] = f"has not run for {(now - beat) / 1e9:.1f} s (a stopped process: SIGSTOP, a debugger?)"
            elif entered < target and finished == entered:
                blamed[rank] = f"has not reached it: it is busy or blocked after collective {finished} of {target}"
            elif entered < target:
                waiting[rank] = f"is still waiting in collective {entered} of {target}"
        return blamed or waiting


def _anonymous_file(nbytes: int) -> int:
    if hasattr(os, "memfd_create"):  # Linux: memory only, no name anywhere
        fd = os.memfd_create("pagedbatch-tp-board")
    else:  # an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, nbytes)
    return fd


class Watchdog:
    """Calls ``fire(what, timeout_s)`` once, from its own thread, when rank 0's main thread has stayed inside
    a ``span`` without touching the group for longer than that span's timeout plus a margin.

    ``fire`` is held weakly (a bound method of the group), so the thread keeps nothing alive.
    """

    def __init__(self, fire: Callable[[str, float], None], poll_s: float):
        self._fire = weakref.WeakMethod(fire)
        self._depth = 0
        self._what = ""
        self._timeout_s = 0.0
        self._touched = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(poll_s,), name="pagedbatch-tp-watchdog", daemon=True).start()

    @contextmanager
    def span(self, what: str, timeout_s: float):
        """The main thread depends on the workers in here (nested spans keep the outermost's label)."""
        if self._depth == 0:
            self._what, self._timeout_s = what, timeout_s
        self._depth += 1
        self._touched = time.monotonic()
        try:
            yield
        finally:
            self._depth -= 1
            self._touched = time.monotonic()

    def touch(self) -> None:
        """The main thread is back in the group: a wait began or ended."""
        self._touched = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            limit = self._timeout_s + min(5.0, self._timeout_s / 2)
            if self._depth and time.monotonic() - self._touched > limit:
                self._stop.set()
                fire = self._fire()
                if fire is not None:
                    try:
                        fire(self._what, self._timeout_s)
                    except Exception:  # a thread has no caller to raise to
                        log.exception("the tensor-parallel watchdog failed to stop the workers")


class NoWatchdog:
    """A worker's: it waits on rank 0 as long as rank 0 takes (an idle server), and ends when rank 0 does."""

    @contextmanager
    def span(self, what: str, timeout_s: float):
        yield

    def touch(self) -> None:
        pass

    def stop(self) -> None:
        pass
