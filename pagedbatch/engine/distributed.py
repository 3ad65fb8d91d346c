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
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .step_inputs import packed_length

HEADER_LEN = 8  # StepInputs.header
# Collectives never time out: a worker legitimately waits for hours for a
# step of an idle server, and a timed-out gloo or NCCL operation cannot be
# retried. Dead peers are detected by sockets and process polling instead.
_NO_TIMEOUT = timedelta(days=365)
_POLL_WORKERS_S = 0.05


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited; the engine cannot continue."""


class TPGroup:
    """This process's rank in its engine's tensor-parallel group.

    ``workers`` (rank 0 only) is the ``WorkerProcesses`` it started; it is
    polled for deaths and stopped by ``close``.
    """

    def __init__(self, rank: int, size: int, device: torch.device, store, workers=None):
        self.rank, self.size, self.device = rank, size, device
        self.workers = workers
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # one host: loopback
        opts._timeout = _NO_TIMEOUT
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
        self.closed = False
        # Interpreter exit or a forgotten engine: stop the workers and tear the
        # groups down (a gloo group destroyed at exit with a dead peer aborts the process).
        self._finalizer = weakref.finalize(self, _teardown, self.control, self.data, workers)
        if device.type == "cuda":
            self.barrier()  # every rank is up before NCCL's (blocking) communicator setup ...
            self.all_reduce(torch.zeros(1, device=device))  # ... which this first collective runs

    # -- the model's collectives (data group) ---------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        self._wait(self.data.allreduce([x], self._sum))
        return x

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
        """Rank 0: every rank's vocabulary slice side by side, padding cut off ([S, vocab_size]); others: None."""
        if self.rank != 0:
            self._wait(self.data.gather([], [logits], self._gather))
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        self._wait(self.data.gather([parts], [logits], self._gather))
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    # -- the step plan: rank 0 sends, workers receive --------------------------

    def send_step(self, header: tuple[int, ...], packed: torch.Tensor) -> None:
        self._header.copy_(torch.tensor(header, dtype=torch.int64))
        self._wait(self.control.broadcast([self._header], self._root))
        self._wait(self.data.broadcast([packed], self._root))

    def recv_step(self) -> tuple[tuple[int, ...], torch.Tensor]:
        """The next step's (header, packed inputs); waits as long as rank 0 has no work."""
        self._wait(self.control.broadcast([self._header], self._root))
        header = self._header.tolist()
        packed = torch.empty(packed_length(header), dtype=torch.int64, device=self.device)
        self._wait(self.data.broadcast([packed], self._root))
        return tuple(header), packed

    # -- setup (control group, host ints) --------------------------------------

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._wait(self.control.allreduce([t], self._min))
        return int(t.item())

    def all_ints(self, value: int) -> list[int]:
        """``value`` of every rank, by rank."""
        out = [torch.empty(1, dtype=torch.int64) for _ in range(self.size)]
        self._wait(self.control.allgather([out], [torch.tensor([value], dtype=torch.int64)]))
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
    def in_step(self):
        """Rank 0: the span of a step in which the workers run the same collectives.

        Leaving it by an exception (an out-of-memory error, a KeyboardInterrupt)
        leaves the workers inside collectives rank 0 will never join; the
        group cannot be used again, so it is torn down and later calls raise.
        """
        try:
            yield
        except BaseException as e:
            if self.failure is None:
                self.failure = RuntimeError(
                    f"the tensor-parallel engine stopped in the middle of a step ({type(e).__name__}: {e}); "
                    "its workers were stopped and it cannot continue")
                self._finalizer()
            raise

    def wait_event(self, event) -> None:
        """Wait for a CUDA event without ever blocking on a dead worker's collective."""
        next_poll = time.monotonic() + _POLL_WORKERS_S
        while not event.query():
            if time.monotonic() >= next_poll:
                self.check_workers()
                next_poll = time.monotonic() + _POLL_WORKERS_S
            time.sleep(0)  # lets other threads (the HTTP server's loop) run

    def synchronize(self) -> None:
        """``torch.cuda.synchronize`` that fails instead of hanging when a worker dies (no-op on the CPU)."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.wait_event(event)

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            if self.workers is None:  # a worker: rank 0 or a peer is gone, nothing to report to
                raise
            # The socket closed first; give the OS a moment to report the exit itself.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not self.workers.dead():
                time.sleep(0.01)
            self._fail(self.workers.dead() or [], cause=e)

    def _fail(self, dead: list[str], cause: Optional[BaseException] = None) -> None:
        what = "; ".join(dead) if dead else f"a collective failed ({cause})"
        self.failure = WorkerDiedError(
            f"tensor-parallel worker failure: {what}. The engine cannot continue; its other workers were stopped. "
            "A worker's own error, if it had one, is printed above.")
        self._finalizer()
        raise self.failure from cause

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


def _teardown(control, data, workers) -> None:
    if workers is not None:
        workers.stop()
    for group in {id(g): g for g in (data, control)}.values():
        try:
            group.abort()
        except (RuntimeError, AttributeError):
            pass
