"""One run at a time per shard of a job: a lock file in OUT, held while the run writes there.

Two runs of the same command on one OUT (a cron job that overlaps itself, a
Slurm requeue while the first allocation still runs, an accidental second
launch) would each see the same committed indices, answer the same rows and
commit them twice. The run takes an exclusive ``flock`` on
``OUT/.lock-shard-NNNNN`` before it reads OUT's state and keeps it until it
ends; a second run of that shard stops before any work, naming the first
one's process id. Shards of a Slurm array lock their own files and run side
by side; ``--overwrite`` (which deletes every shard's results) also checks
that no other shard is running. The kernel drops a lock with its process,
so a run killed by SIGKILL or a crashed node leaves nothing to clean up (the
file stays; an unlocked file means nobody holds it). Data-parallel workers
write under the parent's lock.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX: no locking (the job runner targets Linux)
    fcntl = None

LOCK_PREFIX = ".lock-shard-"


class OutputLocked(Exception):
    """Another run holds the lock (its message says which and what to do)."""


def _lock_path(out: str, shard_index: int) -> str:
    return os.path.join(out, f"{LOCK_PREFIX}{shard_index:05d}")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


class OutputLock:
    """``with OutputLock(out, shard_index, overwrite):`` around everything a run does in OUT."""

    def __init__(self, out: str, shard_index: int, overwrite: bool = False):
        self.out, self.shard_index, self.overwrite = out, shard_index, overwrite
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(_lock_path(self.out, self.shard_index), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputLocked(
                f"{self.out} is in use: {who} is running this job{self._shard()} there now, and two runs would "
                "answer the same rows twice. Nothing was done. Wait for it to end (or stop it), then run the "
                "same command to resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if self.overwrite:
            try:
                self._check_other_shards_idle()
            except OutputLocked:
                self.release()
                raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def _shard(self) -> str:
        return f" (shard {self.shard_index})" if self.shard_index else ""

    def _check_other_shards_idle(self) -> None:
        busy = busy_shard(self.out, self.shard_index)
        if busy is not None:
            shard, who = busy
            raise OutputLocked(
                f"--overwrite would delete the results of shard {shard} of this job, which {who} is writing "
                f"into {self.out} now. Nothing was done. Wait for it to end (or stop it), or use another --output")


def busy_shard(out: str, shard_index: int) -> Optional[tuple[int, str]]:
    """(shard, holder) of a shard other than ``shard_index`` whose run holds its lock in OUT now, or None."""
    if fcntl is None:
        return None
    mine = _lock_path(out, shard_index)
    for path in sorted(glob.glob(os.path.join(glob.escape(out), LOCK_PREFIX + "*"))):
        if path == mine:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(path[len(os.path.join(out, LOCK_PREFIX)):]), _holder(fd)
        finally:
            os.close(fd)  # also drops the probe's lock if it got one
    return None
