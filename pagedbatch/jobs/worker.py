"""A data-parallel worker: one engine replica in its own process, fed rows by the job's parent.

Started by ``pagedbatch.jobs.data_parallel`` as ``python -m pagedbatch.jobs.worker FD``
with its GPUs pinned through ``CUDA_VISIBLE_DEVICES``; FD is its end of a
socket pair to the parent. It loads the engine, says "ready", then asks for
a chunk of prepared rows whenever its engine has room for more than it holds,
runs them and commits its own parts (``part-SSSSS-RUNID-wI-NNNNNN.parquet``)
into the job's results directory. See ``data_parallel`` for the protocol and
why it keeps every row exactly once.

The worker never outlives its parent: an orphan could commit a row that a
resumed job is redoing, so on Linux the kernel kills it when the parent dies
(PR_SET_PDEATHSIG), and elsewhere the closed socket makes it exit, without
committing, at the next step. SIGINT and SIGTERM are the parent's to handle
(Ctrl-C and Slurm signal the whole process group); the parent then sends
"stop" and the worker commits what it finished.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Optional

from ..io.parquet_writer import is_disk_full
from .options import JobOptions

# A worker whose parent is gone exits at once with this code, committing nothing.
EXIT_PARENT_GONE = 75
_PROGRESS_INTERVAL_S = 0.25  # how often counters reach the parent's progress display
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent as its first message."""

    index: int
    opts: JobOptions
    engine_config: Any  # EngineConfig, its model and tokenizer resolved to local directories
    carried: Any  # CarriedColumns: the result schema's carried input columns
    input_format: str
    run_id: str  # the parent's; this worker's parts are named with f"{run_id}-w{index}"
    chunk_rows: int  # rows the parent deals per request
    already_committed: int
    torch_threads: Optional[int]  # CPU workers share the cores; None: torch's default


class _ParentGone(Exception):
    pass


class _Link:
    """The socket to the parent; any failure on it means the parent is gone."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, kind: str, payload: Any = None) -> None:
        try:
            self.conn.send((kind, payload))
        except (OSError, EOFError):
            raise _ParentGone from None

    def recv(self, timeout: float) -> Optional[tuple[str, Any]]:
        try:
            if not self.conn.poll(timeout):
                return None
            return self.conn.recv()
        except (OSError, EOFError):
            raise _ParentGone from None


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent(parent)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    link = _Link(Connection(int(argv[1])))
    try:
        kind, spec = link.recv(timeout=None)
        assert kind == "start", kind
        return _Worker(spec, link).run()
    except _ParentGone:
        os._exit(EXIT_PARENT_GONE)  # no commit, no cleanup: a resumed job may already own these rows


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the closed socket is the signal
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_PARENT_GONE)


class _Worker:
    def __init__(self, spec: WorkerSpec, link: _Link):
        self.spec = spec
        self.link = link
        self.backlog: collections.deque = collections.deque()  # rows received, not yet admitted
        self.backlog_samples = 0  # what the backlog will occupy in the engine (num_samples)

    def run(self) -> int:
        spec = self.spec
        try:
            replica = self._load()
        except Exception as e:  # the parent reports it as the job's error
            self.link.send("failed", {"error": f"could not load the model from {spec.engine_config.model}: "
                                               f"{type(e).__name__}: {e}", "at_load": True})
            return 1
        from .replica import describe_engine

        self.replica = replica
        try:
            self.link.send("ready", {"pid": os.getpid(),
                                     **describe_engine(replica.engine, spec.input_format, spec.already_committed)})
            return self._loop()
        except _ParentGone:
            raise
        except BaseException as e:
            # Finished rows are valid: commit them, then report the error (the parent fails the job).
            dropped = replica.abort_in_flight() + len(self.backlog)
            if is_disk_full(e):  # committing again would fail the same way; the message says all
                self.link.send("failed", {"error": str(e), "dropped": dropped, **self._progress()})
                return 1
            error = f"{type(e).__name__}: {e}"
            try:
                replica.commit()
            except Exception as commit_error:
                dropped += replica.writer.pending()
                cause = commit_error if is_disk_full(commit_error) else \
                    f"{type(commit_error).__name__}: {commit_error}"
                error += f"; committing the finished rows also failed: {cause}"
            self.link.send("failed", {"error": error, "dropped": dropped,
                                      "traceback": traceback.format_exc(limit=8), **self._progress()})
            return 1
        finally:
            replica.engine.shutdown()  # a tensor-parallel engine's ranks end with it

    def _load(self):
        spec, opts = self.spec, self.spec.opts
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        from ..engine.llm_engine import LLMEngine
        from ..io import PartWriter
        from .manifest import RESULTS
        from .replica import Replica, job_result_schema

        engine = LLMEngine(spec.engine_config)
        writer = PartWriter(os.path.join(opts.output, RESULTS), job_result_schema(opts, spec.carried),
                            shard_index=opts.shard_index, run_id=f"{spec.run_id}-w{spec.index}")
        return Replica(opts, engine, writer, self._on_commit)

    def _on_commit(self, part: str, counters, stats: dict) -> None:
        self.link.send("commit", {"part": part, "stats": stats, **self._progress()})

    def _progress(self) -> dict:
        return {"counters": self.replica.counters.as_dict(), "errors": list(self.replica.first_errors)}

    def _loop(self) -> int:
        from .prepare import num_samples

        rep, engine = self.replica, self.replica.engine
        cap, chunk = self.spec.opts.effective_max_in_flight, self.spec.chunk_rows
        asked = ended = False
        sent_rows, last_progress = -1, 0.0
        while True:
            idle = not self.backlog and not engine.has_unfinished_requests()
            # Block only when there is nothing to run; otherwise just look for messages between steps.
            msg = self.link.recv(timeout=0.5 if idle and (asked or ended) else 0)
            while msg is not None:
                kind, payload = msg
                if kind == "rows":
                    self.backlog.extend(payload)
                    self.backlog_samples += sum(map(num_samples, payload))
                    asked = False
                elif kind == "end":
                    ended, asked = True, False
                elif kind == "stop":
                    dropped = rep.abort_in_flight() + len(self.backlog)
                    rep.commit()
                    self.link.send("done", {"dropped": dropped, "stats": engine.stats(), **self._progress()})
                    return 0
                msg = self.link.recv(timeout=0)
            # Counted in samples, as --max-in-flight counts them (a record of n occupies n sequences).
            while self.backlog and rep.samples_in_flight < cap:
                item = self.backlog.popleft()
                self.backlog_samples -= num_samples(item)
                rep.add(item)
            if not ended and not asked and rep.samples_in_flight + self.backlog_samples < cap + chunk:
                # One request outstanding at a time, one chunk of look-ahead: the engine never
                # waits for a round trip, and a slow worker holds about cap samples plus one chunk.
                self.link.send("want", self._progress())
                asked = True
            if engine.has_unfinished_requests():
                rep.step()
            elif ended and not self.backlog:
                rep.commit()
                self.link.send("done", {"dropped": 0, "stats": engine.stats(), **self._progress()})
                return 0
            rep.maybe_commit()
            now = time.monotonic()
            if rep.counters.rows != sent_rows and now - last_progress >= _PROGRESS_INTERVAL_S:
                self.link.send("progress", self._progress())
                sent_rows, last_progress = rep.counters.rows, now


if __name__ == "__main__":
    sys.exit(main(sys.argv))
