"""Data parallel on one node: N engine worker processes fed rows on demand by this (the parent) process.

Design
------
* The parent does everything that is about *rows*: it reads the input,
  skips committed indices, applies ``--max-rows`` and sharding, parses,
  validates and tokenizes every record (with the tokenizer alone, no model)
  and applies ``--order``. Bad records become error rows here, exactly as in
  the single-process job. Workers only run engines.
* Each worker (``pagedbatch.jobs.worker``) is its own process, pinned to GPUs
  ``[i*tp, (i+1)*tp)`` of the visible ones through ``CUDA_VISIBLE_DEVICES``
  (tp: the engine's tensor-parallel size), or sharing the CPU cores with
  ``cores // N`` torch threads each. It talks to the parent over a socket
  pair with pickled ``(kind, payload)`` messages:

      worker -> parent: ready, want, progress, commit, done, failed
      parent -> worker: start (the WorkerSpec), rows (a chunk), end, stop

* Rows are dealt in small chunks on demand, never split up front: a worker
  asks ("want") whenever its engine holds fewer than ``max_in_flight`` plus
  one chunk of rows, and the parent answers with the next chunk of the one
  prepared stream. A worker's chunks grow 1, 2, 4, ... rows up to the
  chunk size, so a small job spreads over every worker too. A slow worker (a long tail, a slower GPU) simply asks less
  often, and holds at most ``max_in_flight + chunk`` rows at any moment.
  Dealing starts only once every worker has loaded its model, so the first
  one ready cannot take a small job's every row. Memory stays bounded: the
  parent prepares rows only when a worker asks (plus the ``--order`` window).
* Exactly once: each index is dealt to one worker, from indices committed
  before the run began; every worker commits its own parts under its own
  name (``part-SSSSS-RUNID-wI-NNNNNN``) into the same results directory,
  atomically. Rows that were dealt but not committed when something died
  are simply not in any part, so the rerun redoes them. A worker never
  outlives the parent (it would commit rows a resumed job is redoing): the
  kernel kills it when the parent dies (PR_SET_PDEATHSIG on Linux; elsewhere
  it exits at the next step when its socket closes).
* Failures: a worker that dies (SIGKILL, the OOM killer, a GPU fault) closes
  its socket, which wakes the parent at once; the parent stops the others
  (each commits what it finished), writes the report and fails the job with
  the worker's exit status and its last lines of output. SIGTERM/SIGINT to
  the parent stop admission the same way and end with the resume message.
* One progress log and one report: the parent writes every event
  (workers send their counters and engine statistics), so the report has
  the aggregate and a row per worker.

The parent prepares every row, so its one core bounds the rate: a chunk
of rows costs a tokenizer call per row and one pickled message, far below
an engine's time for the same rows unless prompts are long and outputs a
token or two.
"""
from __future__ import annotations

import collections
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Iterator, Mapping, Optional, TextIO

from ..io.carried import CarriedColumns
from .options import JobOptions
from .progress import Counters, ProgressDisplay, ProgressLog
from .replica import error_rate_exceeded
from .signals import StopRequest
from .worker import WorkerSpec

# A stopped worker finishes its step and commits; past this it is killed.
_STOP_GRACE_S = 120.0
_TAIL_LINES = 20
_POLL_S = 0.25


@dataclass
class WorkerSlot:
    """Where worker i runs: its CUDA_VISIBLE_DEVICES (None on the CPU) and torch threads."""

    index: int
    cuda_visible_devices: Optional[str]
    torch_threads: Optional[int]

    @property
    def label(self) -> str:
        if self.cuda_visible_devices is None:
            return f"cpu, {self.torch_threads} thread(s)"
        return f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}"


def plan_workers(size: Any, tensor_parallel_size: int, device: Optional[str], visible_gpus: list[str],
                 cpu_count: int) -> list[WorkerSlot]:
    """The worker slots for ``--data-parallel-size`` (an int or "auto"). GPU
    workers get ``tensor_parallel_size`` consecutive GPUs each; CPU workers
    (``--device cpu``, or no GPU visible) split the cores. Raises ValueError,
    naming the options, when there are not enough GPUs."""
    on_gpu = device != "cpu" and bool(visible_gpus)
    if device is not None and device.startswith("cuda") and not visible_gpus:
        raise ValueError(f"--device {device} was given but no CUDA GPU is visible")
    tp = max(int(tensor_parallel_size or 1), 1)
    if size == "auto":
        size = max(len(visible_gpus) // tp, 1) if on_gpu else 1
    if not on_gpu:
        threads = max(cpu_count // size, 1)
        return [WorkerSlot(i, None, threads) for i in range(size)]
    if size * tp > len(visible_gpus):
        raise ValueError(
            f"--data-parallel-size {size} x --tensor-parallel-size {tp} needs {size * tp} GPUs, but "
            f"{len(visible_gpus)} are visible ({', '.join(visible_gpus)}); lower --data-parallel-size "
            "or use 'auto'")
    return [WorkerSlot(i, ",".join(visible_gpus[i * tp:(i + 1) * tp]), None) for i in range(size)]


def visible_gpus(env: Mapping[str, str], count: int) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs)."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def chunk_rows(max_in_flight: int) -> int:
    # Small enough that the last chunks spread over every worker, large enough
    # that a round trip per chunk is nothing next to running it.
    return max(1, min(16, max_in_flight // 8))


class _WorkerProcess:
    """The parent's handle on one worker: its process, socket, output tail and last report."""

    def __init__(self, slot: WorkerSlot, env: dict[str, str], err: TextIO):
        self.slot = slot
        self.index = slot.index
        ours, theirs = socket.socketpair()
        env = dict(env)
        if slot.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
        if slot.torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(slot.torch_threads)  # before torch starts its pool
        # The worker must import this very package, wherever it was imported from.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagedbatch.jobs.worker", str(theirs.fileno())], env=env,
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
        finally:
            theirs.close()  # only the child holds it now: its death closes the socket
        self.conn = Connection(ours.detach())
        self.tail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
        self._reader = threading.Thread(target=self._forward, args=(err,), daemon=True,
                                        name=f"pagedbatch-worker-{self.index}-output")
        self._reader.start()
        self.state = "starting"  # starting | ready | done | failed
        self.info: dict[str, Any] = {}
        self.counters = Counters()
        self.errors: list[str] = []
        self.stats: Optional[dict] = None
        self.dropped = 0
        self.wants = False  # asked for rows before dealing began
        # Chunks grow 1, 2, 4, ... up to the job's chunk size, so that a job of a
        # few rows still spreads over every worker instead of filling the first to ask.
        self.next_chunk = 1
        self.stopped_at: Optional[float] = None

    def _forward(self, err: TextIO) -> None:
        # The worker's output reaches the user prefixed; the tail goes into a failure message.
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            try:
                print(f"[worker {self.index}] {line}", file=err, flush=True)
            except ValueError:
                pass  # err was closed (the job already returned)

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    def send(self, kind: str, payload: Any = None) -> bool:
        try:
            self.conn.send((kind, payload))
            return True
        except OSError:
            return False  # it died; its socket's EOF reports that

    def update(self, payload: dict) -> None:
        if "counters" in payload:
            self.counters = Counters(**payload["counters"])
            self.errors = payload.get("errors", self.errors)
        if "stats" in payload:
            self.stats = payload["stats"]

    def exit_description(self) -> str:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its connection but is still running"
        self._reader.join(timeout=2)
        if rc < 0:
            name = signal.Signals(-rc).name
            why = " (the kernel's out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
            text = f"was killed by {name}{why}"
        else:
            text = f"exited with code {rc}"
        lines = [line for line in self.tail if line.strip()]
        if lines:
            text += "; its last output:\n    " + "\n    ".join(lines[-10:])
        return text

    def name(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid}, {self.slot.label})"

    def close(self) -> None:
        # A worker that said "done" is exiting (a tensor-parallel engine stops its ranks
        # first): let it; any other is killed at once.
        try:
            self.proc.wait(timeout=10 if self.state == "done" else 0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=2)
        self.conn.close()


class DataParallelJob:
    """Run one shard of a job over N worker processes: ``start``, ``run``
    (returns "complete", "interrupted", "aborted" or "failed"; ``failure``
    then says what failed), ``close``."""

    def __init__(self, opts: JobOptions, slots: list[WorkerSlot], *, engine_config, carried: CarriedColumns,
                 input_format: str, run_id: str, already_committed: int, log: ProgressLog, err: TextIO,
                 env: Optional[Mapping[str, str]] = None):
        self.opts = opts
        self.slots = slots
        self.engine_config = engine_config  # model and tokenizer already resolved to local directories
        self.carried = carried
        self.input_format = input_format
        self.run_id = run_id
        self.already_committed = already_committed
        self.log = log
        self.err = err
        self.env = dict(os.environ if env is None else env)
        self.chunk = chunk_rows(opts.effective_max_in_flight)
        self.workers: list[_WorkerProcess] = []
        self.todo: Iterator = iter(())
        self.exhausted = False
        self.dealt = 0  # records sent to workers this run
        self.dealing = False
        self.display: Optional[ProgressDisplay] = None
        self.stopping: Optional[str] = None  # the status the job ends with, once a stop was sent
        self.failure = ""

    # -- the aggregate ---------------------------------------------------------

    @property
    def counters(self) -> Counters:
        total = Counters()
        for w in self.workers:
            for k, v in w.counters.as_dict().items():
                setattr(total, k, getattr(total, k) + v)
        return total

    @property
    def first_errors(self) -> list[str]:
        return list(itertools.islice(itertools.chain.from_iterable(w.errors for w in self.workers), 5))

    @property
    def dropped(self) -> int:
        return sum(w.dropped for w in self.workers)

    # -- the loop -------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; they load their models while the caller gets ready."""
        for slot in self.slots:
            self.workers.append(_WorkerProcess(slot, self.env, self.err))
        for w in self.workers:
            w.send("start", WorkerSpec(
                index=w.index, opts=self.opts, engine_config=self.engine_config, carried=self.carried,
                input_format=self.input_format,
                run_id=self.run_id, chunk_rows=self.chunk, already_committed=self.already_committed,
                torch_threads=w.slot.torch_threads))

    def run(self, todo: Iterator, stop: StopRequest) -> str:
        """Deal ``todo`` (prepared rows and error rows) to the workers until it
        runs out or the job stops, and wait for all of them to finish."""
        self.todo = todo
        while any(w.alive for w in self.workers):
            if stop.requested and not self.stopping:
                self._stop_all("interrupted")
            live = {w.conn: w for w in self.workers if w.alive}
            for conn in wait(list(live), timeout=_POLL_S):
                self._handle(live[conn])
            if self.display is not None:
                self.display.update(self.counters)
            if not self.stopping and error_rate_exceeded(self.opts, self.counters, self.dealt):
                self._stop_all("aborted")
            self._kill_overdue()
        return self.stopping or "complete"

    def close(self, grace_s: float = 0.0) -> None:
        """Reap every worker and close the display. Workers still running are
        first asked to stop and given ``grace_s`` to commit their finished
        rows, then killed."""
        running = [w for w in self.workers if w.proc.poll() is None]
        if grace_s and running:
            for w in running:
                if w.stopped_at is None:
                    w.send("stop")
            deadline = time.monotonic() + grace_s
            for w in running:
                try:
                    w.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    pass
        for w in self.workers:
            w.close()
        if self.display is not None:
            self.display.close()

    def _handle(self, w: _WorkerProcess) -> None:
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            w.state = "failed"
            self._fail(f"{w.name()} {w.exit_description()}")
            self._log_worker_end(w, "died")
            return
        w.update(payload)
        if kind == "ready":
            w.state, w.info = "ready", payload
            if all(x.state == "ready" for x in self.workers):
                self._start_dealing()
        elif kind == "want":
            if self.dealing:
                self._deal(w)
            else:
                w.wants = True
        elif kind == "commit":
            self.log.write("commit", worker=w.index, part=payload["part"], counters=self.counters.as_dict(),
                           worker_counters=w.counters.as_dict(), stats=payload["stats"])
        elif kind == "done":
            w.state, w.dropped = "done", payload.get("dropped", 0)
            self._log_worker_end(w, "done")
        elif kind == "failed":
            w.state, w.dropped = "failed", payload.get("dropped", 0)
            error = payload["error"]
            if payload.get("traceback"):  # none for a full disk: its message says all
                error += "\n" + payload["traceback"].rstrip()
            self._fail(f"{w.name()} failed: {error}")
            self._log_worker_end(w, "failed", error=payload["error"])
        elif kind != "progress":
            raise AssertionError(f"unknown message {kind!r} from worker {w.index}")

    def _log_worker_end(self, w: _WorkerProcess, status: str, **extra: Any) -> None:
        if self.dealing:  # before that the run has no "start" event, and nothing ran
            self.log.write("worker_end", worker=w.index, status=status, worker_counters=w.counters.as_dict(),
                           stats=w.stats, **extra)

    def _start_dealing(self) -> None:
        first = self.workers[0].info
        names = sorted({w.info.get("device_name") for w in self.workers})
        self.log.write(
            "start", **{k: v for k, v in first.items() if k not in ("pid", "device_name", "counters", "errors")},
            device_name=f"{len(self.workers)} x {names[0]}" if len(names) == 1 else ", ".join(map(str, names)),
            data_parallel_size=len(self.workers),
            workers=[{"worker": w.index, "pid": w.info.get("pid"), "device": w.info.get("device"),
                      "device_name": w.info.get("device_name"), "placement": w.slot.label} for w in self.workers])
        self.dealing = True
        # Its clock starts now, as the single-process job's starts after the model loaded.
        self.display = ProgressDisplay(self.opts.quiet, self.opts.log_interval_s, self.opts.max_rows,
                                       self.already_committed, stream=self.err)
        for w in self.workers:
            if w.wants:
                w.wants = False
                self._deal(w)

    def _deal(self, w: _WorkerProcess) -> None:
        if self.stopping:
            return  # it was sent "stop" and will not ask again
        try:
            items = [] if self.exhausted else list(itertools.islice(self.todo, w.next_chunk))
        except Exception as e:  # e.g. a CSV file malformed halfway: workers still commit what they finished
            self._fail(f"reading the input failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
            return
        if not items:
            self.exhausted = True
            w.send("end")
            return
        w.send("rows", items)
        self.dealt += len(items)  # records (prepared or error rows): what the error rate is taken over
        w.next_chunk = min(2 * w.next_chunk, self.chunk)

    def _fail(self, message: str) -> None:
        # The first failure is the cause (it outranks an interrupt or an abort);
        # the other workers then stop because of it.
        if self.stopping != "failed":
            self.stopping, self.failure = "failed", message
        self._send_stop()

    def _stop_all(self, status: str) -> None:
        if self.stopping is None:
            self.stopping = status
        self._send_stop()

    def _send_stop(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.alive and w.stopped_at is None:
                w.stopped_at = now
                w.send("stop")

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.alive and w.stopped_at is not None and now - w.stopped_at > _STOP_GRACE_S:
                w.proc.kill()  # its socket's EOF then marks it failed


def cuda_device_count(device: Optional[str]) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this job may use (Slurm, taskset), not the machine's
    except AttributeError:
        return os.cpu_count() or 1
