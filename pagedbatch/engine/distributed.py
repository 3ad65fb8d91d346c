"""One rank's tensor-parallel group: the model's collectives, the step broadcast, and failure detection.

Two process groups over one rendezvous store:

- ``control`` (gloo, host memory): the 8-integer header of each step and
  the few setup messages. A worker waits for its next step in a socket
  read here, not in a GPU kernel, so an idle engine burns no GPU and the
  worker's host can queue step N+1 while its GPU still runs step N.
- ``data`` (NCCL between GPUs, the same gloo group on the CPU): the packed
  step inputs (device memory on rank 0: decode rows' ids are sampled on the
  GPU and never visit the host), the model's all-reduces and the gather of
  the logits to rank 0.

The groups are objects of this engine, not torch.distributed's process-wide
default group, so several engines (tests, data-parallel replicas) live side
by side in one process.

Failures: a dead gloo peer makes every pending gloo operation raise at
once ("connection closed by peer"); a dead NCCL peer leaves our kernels
waiting forever, so rank 0 never blocks in a CUDA sync while workers run:
it polls the event and the worker processes (``wait_event``). Either way the
caller gets a ``WorkerDiedError`` naming the rank and its exit status.

A worker that is alive but stuck (blocked in a collective, deadlocked,
stopped, a hung GPU) closes no socket. Rank 0 waits on the workers only
with a deadline: ``tp_timeout_s`` in steps, ``tp_setup_timeout_s`` before
the first one. A gloo wait is given the timeout, a CUDA event is polled
against it, and the watchdog (tp_watch) covers what blocks elsewhere. Past
it, rank 0 kills the workers, tears the groups down and raises a
``WorkerStuckError`` naming the ranks that did not respond (from the
progress board: tp_watch). Workers wait on rank 0 without a timeout: an
idle server sends no step for hours, and a worker ends when rank 0 does.

Teardown: NCCL's communicator abort waits for the node's other ranks, so
rank 0 closes the workers' stdin first (each worker then aborts its own)
and aborts its communicator at the same time, each rank waiting at most
``NCCL_ABORT_WAIT_S``; after a failure (a dead or stuck worker never
joins) rank 0 starts its abort without waiting for it.
"""
from __future__ import annotations

import sys
import threading
import time
import weakref
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .step_inputs import packed_length
from .tp_watch import NoWatchdog, ProgressBoard, Watchdog

HEADER_LEN = 8  # StepInputs.header
# A worker's collectives never time out: it legitimately waits for hours for
# a step of an idle server. Nor do NCCL's on rank 0: NCCL's own watchdog
# would abort the whole process, job runner included; rank 0 times the GPU
# work itself (wait_event).
_NO_TIMEOUT = timedelta(days=365)
_POLL_WORKERS_S = 0.05
# How long a teardown waits for NCCL's communicator abort. Recent NCCL synchronizes the ranks of a node even
# in ncclCommAbort, so a rank that aborts alone waits for its peers to abort too: on two H200s, rank 0's
# abort after its workers had exited never returned (2026-12-04). Every rank now aborts at once, and none
# waits longer than this for it (a peer that died cannot join).
NCCL_ABORT_WAIT_S = 10.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited; the engine cannot continue."""


class WorkerStuckError(WorkerDiedError):
    """A tensor-parallel worker did not respond within the engine's timeout; its processes were killed."""


class TPGroup:
    """This process's rank in its engine's tensor-parallel group.

    ``workers`` (rank 0 only) is the ``WorkerProcesses`` it started; it is
    polled for deaths and stopped by ``close``. ``timeouts`` (rank 0 only):
    the seconds it waits on the workers in a step and during setup
    (``tp_timeout_s``, ``tp_setup_timeout_s``).
    """

    def __init__(self, rank: int, size: int, device: torch.device, store, board: ProgressBoard, workers=None,
                 timeouts: Optional[tuple[float, float]] = None):
        self.rank, self.size, self.device = rank, size, device
        self.workers = workers
        self.board = board
        self.ops = 0  # host (gloo) collectives entered: the same sequence on every rank
        self.steps = 0  # steps begun (rank 0); 0 while setting up
        self._timeouts = timeouts or (float("inf"), float("inf"))  # a worker's waits have no deadline
        self._step_wait, self._setup_wait = (timedelta(seconds=t) for t in timeouts or (0, 0))  # rank 0's
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # one host: loopback
        # On rank 0 this bounds the rendezvous; its waits carry their own, shorter or equal, deadlines.
        opts._timeout = _NO_TIMEOUT if timeouts is None else timedelta(seconds=max(timeouts))
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, opts)
        if device.type == "cuda":
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = _NO_TIMEOUT
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, nccl_opts)
        else:
            self.data = self.control
        self._sum, self._min = dist.AllreduceOptions(), dist.AllreduceOptions()
        self._sum.reduceOp, self._min.reduceOp = dist.ReduceOp.SUM, dist.ReduceOp.MIN
        self._root = dist.BroadcastOptions()
        self._root.rootRank = 0
        self._gather = dist.GatherOptions()
        self._gather.rootRank = 0
        self._header = torch.empty(HEADER_LEN, dtype=torch.int64)
        self.failure: Optional[RuntimeError] = None  # a WorkerDiedError, or rank 0's own failure mid-step
        self._failing = threading.Lock()  # the watchdog thread may fail the group too
        self.closed = False
        self._watch = NoWatchdog() if workers is None else \
            Watchdog(self._watchdog_fired, poll_s=max(0.01, min(0.5, min(self._timeouts) / 10)))
        # Interpreter exit or a forgotten engine: stop the workers and tear the
        # groups down (a gloo group destroyed at exit with a dead peer aborts the process).
        self._teardown_state = {"failed": False}  # read by _teardown, which must not hold self
        self._finalizer = weakref.finalize(self, _teardown, self.control, self.data, workers, self._watch,
                                           self._teardown_state)
        if device.type == "cuda":
            with self.span("NCCL's communicator setup"):
                self.barrier()  # every rank is up before NCCL's (blocking) communicator setup ...
                self.all_reduce(torch.zeros(1, device=device))  # ... which this first collective runs

    # -- the model's collectives (data group) ---------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        self._wait(self.data, self.data.allreduce([x], self._sum), "an all-reduce of the forward pass")
        return x

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
        """Rank 0: every rank's vocabulary slice side by side, padding cut off ([S, vocab_size]); others: None."""
        if self.rank != 0:
            self._wait(self.data, self.data.gather([], [logits], self._gather), "the logits gather")
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        self._wait(self.data, self.data.gather([parts], [logits], self._gather), "the logits gather")
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    # -- the step plan: rank 0 sends, workers receive --------------------------

    def send_step(self, header: tuple[int, ...], packed: torch.Tensor) -> None:
        self._header.copy_(torch.tensor(header, dtype=torch.int64))
        self._wait(self.control, self.control.broadcast([self._header], self._root), "the step's header")
        self._wait(self.data, self.data.broadcast([packed], self._root), "the step's inputs")

    def recv_step(self) -> tuple[tuple[int, ...], torch.Tensor]:
        """The next step's (header, packed inputs); waits as long as rank 0 has no work."""
        self._wait(self.control, self.control.broadcast([self._header], self._root), "the step's header")
        header = self._header.tolist()
        packed = torch.empty(packed_length(header), dtype=torch.int64, device=self.device)
        self._wait(self.data, self.data.broadcast([packed], self._root), "the step's inputs")
        return tuple(header), packed

    # -- setup (control group, host ints) --------------------------------------

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._wait(self.control, self.control.allreduce([t], self._min), "a setup exchange (minimum)")
        return int(t.item())

    def all_ints(self, value: int) -> list[int]:
        """``value`` of every rank, by rank."""
        out = [torch.empty(1, dtype=torch.int64) for _ in range(self.size)]
        self._wait(self.control, self.control.allgather([out], [torch.tensor([value], dtype=torch.int64)]),
                   "a setup exchange (all-gather)")
        return [int(t.item()) for t in out]

    def barrier(self) -> None:
        self.min_int(0)

    # -- failures ----------------------------------------------------------------

    def check_workers(self) -> None:
        """Rank 0: raise WorkerDiedError if a worker has exited (a non-blocking poll)."""
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise RuntimeError("this engine was shut down: its tensor-parallel workers are gone")
        if self.workers is not None:
            dead = self.workers.dead()
            if dead:
                self._fail(dead)

    @contextmanager
    def span(self, what: str):
        """Rank 0: ``what`` depends on the workers (setup that runs collectives, a step).

        Its own waits have deadlines; in between, the watchdog fails the group
        if this thread blocks past the timeout (an NCCL launch behind a hung
        collective). A no-op on the other ranks.
        """
        try:
            with self._watch.span(what, self._timeout_s()):
                yield
        except Exception as e:
            if self.failure is not None and e is not self.failure:
                raise self.failure from e  # the watchdog fired; what unblocked this thread is its consequence
            raise
        if self.failure is not None:  # the watchdog fired and the blocked call then returned
            raise self.failure

    @contextmanager
    def in_step(self):
        """Rank 0: one step's launch, inputs to sampler; the workers run the same collectives in it.

        Leaving it by an exception (an out-of-memory error, a KeyboardInterrupt)
        leaves the workers inside collectives rank 0 will never join; the
        group cannot be used again, so it is torn down and later calls raise.
        """
        self.steps += 1
        try:
            with self.span(f"step {self.steps}"):
                yield
        except BaseException as e:
            self._set_failure(RuntimeError(
                f"the tensor-parallel engine stopped in the middle of a step ({type(e).__name__}: {e}); "
                "its workers were stopped and it cannot continue"))
            raise

    def wait_event(self, event, what: str = "") -> None:
        """Wait for a CUDA event without ever blocking on a dead or stuck worker's collective."""
        timeout = self._timeout_s()
        self._watch.touch()
        start = time.monotonic()
        next_poll = start + _POLL_WORKERS_S
        while not event.query():
            now = time.monotonic()
            if now >= next_poll:
                self.check_workers()
                if now - start > timeout:
                    self._stuck(what or "the GPUs to finish the queued work")
                next_poll = now + _POLL_WORKERS_S
            time.sleep(0)  # lets other threads (the HTTP server's loop) run
        self._watch.touch()

    def synchronize(self) -> None:
        """``torch.cuda.synchronize`` that fails instead of hanging when a worker dies (no-op on the CPU)."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.wait_event(event)

    def _timeout_s(self) -> float:
        return self._timeouts[0] if self.steps else self._timeouts[1]

    def _wait(self, group, work, what: str) -> None:
        if group is not self.control:
            # NCCL: the wait only orders streams, the host never blocks here (rank 0 times the GPU work in
            # wait_event), so the board counts the host collectives alone and this path stays as cheap as it was.
            try:
                work.wait()
            except RuntimeError as e:
                self._wait_failed(e)
            return
        self.ops += 1
        self.board.entered(self.rank, self.ops)
        if self.workers is None:  # a worker: no deadline (see the module's docstring)
            work.wait()
            self.board.finished(self.rank, self.ops)
            return
        if self.failure is not None:  # the watchdog failed the group while this thread was busy
            raise self.failure
        self._watch.touch()
        try:
            work.wait(self._step_wait if self.steps else self._setup_wait)
        except RuntimeError as e:
            if self.failure is None and not work.is_completed():  # the deadline passed, the operation is pending
                self._stuck(what, cause=e)
            self._wait_failed(e)
        self.board.finished(self.rank, self.ops)
        self._watch.touch()

    def _wait_failed(self, e: RuntimeError) -> None:
        if self.workers is None:  # a worker: rank 0 or a peer is gone, nothing to report to
            raise e
        if self.failure is not None:
            raise self.failure from e
        # The socket closed first; give the OS a moment to report the exit itself.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not self.workers.dead():
            time.sleep(0.01)
        self._fail(self.workers.dead() or [], cause=e)

    def _fail(self, dead: list[str], cause: Optional[BaseException] = None) -> None:
        raise self._set_failure(_died(dead, cause)) from cause

    def _stuck(self, what: str, cause: Optional[BaseException] = None) -> None:
        dead = self.workers.dead()
        if dead:  # an exit explains the wait better than a timeout
            self._fail(dead, cause)
        raise self._set_failure(WorkerStuckError(self._stuck_message(what, self._timeout_s())), kill=True) from cause

    def _watchdog_fired(self, what: str, timeout_s: float) -> None:
        dead = self.workers.dead()
        if dead:
            self._set_failure(_died(dead))
        else:
            self._set_failure(WorkerStuckError(self._stuck_message(
                f"{what} (blocked outside its own waits: e.g. a kernel launch behind a collective that never "
                "completes)", timeout_s)), kill=True)

    def _stuck_message(self, what: str, timeout_s: float) -> str:
        pids = dict(enumerate(self.workers.pids, start=1))
        phase = f"step {self.steps}" if self.steps else "setup"
        option = "tp_timeout_s (--tp-timeout-s)" if self.steps else "tp_setup_timeout_s (--tp-setup-timeout-s)"
        late = self.board.laggards(self.ops)
        if late:
            who = "; ".join(f"rank {r} (pid {pids[r]}) {why}" for r, why in late.items())
            head = f"rank 0 waited {timeout_s:g} s in {phase} for {what}, and {who}"
        else:
            ranks = f"rank{'s' if len(pids) > 1 else ''} {', '.join(str(r) for r in pids)}"
            head = (f"rank 0 waited {timeout_s:g} s in {phase} for {what}; every worker ({ranks}) reached it and "
                    "is running, so the operation itself did not complete (a hung GPU, NCCL or interconnect)")
        return (f"tensor-parallel worker stuck: {head}. The engine cannot continue; its workers were killed. "
                f"If a worker is only slow (a slow disk, a long first compile), raise {option}; if it hangs again, "
                "look at that rank while it hangs (py-spy dump --pid PID, nvidia-smi).")

    def _set_failure(self, failure: RuntimeError, kill: bool = False) -> RuntimeError:
        """Record the group's first failure and tear it down (``kill``: at once, a stuck worker ignores its
        stdin closing); returns the failure that stands."""
        with self._failing:
            if self.failure is None:
                self.failure = failure
                if kill and self.workers is not None:
                    self.workers.stop(grace_s=0.0)
                self._teardown_state["failed"] = True
                self._finalizer()
        return self.failure

    # -- shutdown ----------------------------------------------------------------

    def close(self) -> None:
        """Rank 0: end the workers, wait for them, release the groups. Idempotent.

        No stop message is sent: a worker may be inside any collective (a
        failed setup, a step in flight), and a message it does not expect
        would block. Closing its stdin ends it wherever it is (tp_workers).
        """
        if self.closed:
            return
        if self.failure is None:
            try:
                self.synchronize()  # no collective of an overlapped step may be left waiting on a worker we end
            except WorkerDiedError:
                pass
        self.closed = True
        self._finalizer()


def _died(dead: list[str], cause: Optional[BaseException] = None) -> WorkerDiedError:
    what = "; ".join(dead) if dead else f"a collective failed ({cause})"
    return WorkerDiedError(f"tensor-parallel worker failure: {what}. The engine cannot continue; its other workers "
                           "were stopped. A worker's own error, if it had one, is printed above.")


def _abort_quietly(group) -> None:
    try:
        group.abort()
    except (RuntimeError, AttributeError):
        pass


def abort_within(group, wait_s: float) -> bool:
    """``group.abort()`` in a daemon thread, waited for at most ``wait_s``: False if it had not returned
    (the thread is left behind, holding the group, so no destructor runs the abort again)."""
    t = threading.Thread(target=_abort_quietly, args=(group,), name="pagedbatch-group-abort", daemon=True)
    t.start()
    t.join(wait_s)
    return not t.is_alive()


def _teardown(control, data, workers, watch, state) -> None:
    watch.stop()
    if data is not control:
        # NCCL: the workers abort their communicators when their stdin closes (tp_workers), rank 0 at the
        # same time, before waiting for them to exit. After a failure a worker is dead or stuck and never
        # joins: the abort is started (it stops rank 0's kernels waiting on that worker) but not waited for,
        # so the engine's error is raised at once.
        if workers is not None:
            workers.close_stdin()
        if state["failed"]:
            abort_within(data, 0.0)
        elif not abort_within(data, NCCL_ABORT_WAIT_S):
            print(f"[pagedbatch] the NCCL communicator's abort did not return within {NCCL_ABORT_WAIT_S:g} s "
                  "(a worker did not abort its own); left behind", file=sys.stderr, flush=True)
    if workers is not None:
        workers.stop()
    _abort_quietly(control)  # gloo: its peers are gone, the abort does not wait for them
