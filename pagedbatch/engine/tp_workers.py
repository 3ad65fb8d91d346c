"""The worker processes of a tensor-parallel engine: starting them (rank 0) and their main loop (ranks 1..N-1).

Rank 0 is the process that creates the engine. It opens a rendezvous store
on a port the OS picks (so two engines on one machine never collide),
starts each worker as ``python -m pagedbatch.engine.tp_workers`` (a fresh
interpreter: unlike multiprocessing's spawn it re-runs none of the
caller's ``__main__``, and works from daemonic processes such as
data-parallel replicas), and hands it the engine config on its stdin and
the progress board (tp_watch) as an inherited descriptor. The worker keeps
reading stdin: end of file means rank 0 is gone, however it died, and the
worker exits, so no worker outlives its engine. A worker that is stuck
reads nothing: rank 0 kills it.

A worker builds the same ``ModelRunner`` over its shard and loops in
``ModelRunner.serve`` until its stdin closes; the scheduler, block
manager, tokenizer and sampling exist only on rank 0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Optional

import torch

from ..config import EngineConfig
from .distributed import NCCL_ABORT_WAIT_S, TPGroup, WorkerDiedError, WorkerStuckError, abort_within
from .tp_watch import ProgressBoard

_HOST = "127.0.0.1"  # tensor parallelism spans the GPUs of one host
_STOP_GRACE_S = 5.0


class WorkerProcesses:
    """Rank 0's handle on ranks 1..N-1: their processes, polled for deaths, stopped on close.

    ``threads_before``: rank 0's torch thread count before it shared the CPU
    cores with its workers; ``stop`` gives it back.
    """

    def __init__(self, procs: list[subprocess.Popen], threads_before: Optional[int] = None):
        self.procs = procs  # procs[i] is rank i + 1
        self.threads_before = threads_before

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> list[str]:
        """One line per worker that has exited ("rank 1 (pid 123) was killed by signal 9")."""
        out = []
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                out.append(f"rank {rank} (pid {p.pid}) {how}")
        return out

    def close_stdin(self) -> None:
        """Tell the workers to end (each aborts its NCCL communicator, then exits). Idempotent."""
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()
                except OSError:  # a dead worker's pipe
                    pass

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """End the workers: close their stdin (they exit at once), kill any left after ``grace_s``; reap all."""
        self.close_stdin()
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # workers ignore SIGTERM (see main)
                p.wait()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None


def cpu_threads_per_rank(size: int) -> int:
    """Intra-op threads for each of ``size`` CPU ranks, so together they use the cores once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // size)


def start_tensor_parallel(config: EngineConfig, device: torch.device, max_model_len: int) -> TPGroup:
    """Rank 0: start the workers of a ``config.tensor_parallel_size``-way engine and join them in a group."""
    size = config.tensor_parallel_size
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:0; graphs and events use the current device
    store = torch.distributed.TCPStore(_HOST, 0, size, True, timeout=timedelta(seconds=config.tp_setup_timeout_s),
                                       wait_for_workers=False)
    threads = cpu_threads_per_rank(size) if device.type == "cpu" else None
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(min(threads_before, threads))
    spec = {"config": config.to_dict(), "size": size, "port": store.port, "max_model_len": max_model_len,
            "threads": threads}
    env = dict(os.environ)
    # The workers must import this very package, wherever it was imported from.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs = []
    workers = WorkerProcesses(procs, threads_before if threads is not None else None)
    board = ProgressBoard(size)
    spec["board_fd"] = board.fd  # the same number in the child: pass_fds keeps it
    try:
        try:
            for rank in range(1, size):
                p = subprocess.Popen([sys.executable, "-m", "pagedbatch.engine.tp_workers"], stdin=subprocess.PIPE,
                                     env=env, close_fds=True, pass_fds=(board.fd,))
                procs.append(p)
                p.stdin.write((json.dumps({**spec, "rank": rank}) + "\n").encode())
                p.stdin.flush()  # kept open: its end of file tells the worker that rank 0 is gone
        finally:
            os.close(board.fd)  # the mapping stays
        _wait_until_up(store, workers, size, config.tp_setup_timeout_s)
        try:
            return TPGroup(0, size, device, store, board, workers,
                           timeouts=(config.tp_timeout_s, config.tp_setup_timeout_s))
        except WorkerDiedError:  # ours (WorkerStuckError too), from the first collectives
            raise
        except RuntimeError as e:  # gloo's rendezvous timed out
            dead = workers.dead()
            if dead:
                raise WorkerDiedError(f"tensor-parallel worker failed to start: {'; '.join(dead)}") from e
            raise WorkerStuckError(
                f"tensor-parallel workers did not join rank 0's process group within {config.tp_setup_timeout_s:g} s "
                f"(tp_setup_timeout_s, --tp-setup-timeout-s; pids {', '.join(map(str, workers.pids))}): {e}") from e
    except BaseException:
        workers.stop(grace_s=0.0)
        raise


def _wait_until_up(store, workers: WorkerProcesses, size: int, timeout_s: float) -> None:
    # Poll rather than block in the group's rendezvous: a worker that fails
    # to start (an import error, a bad device) is reported at once.
    keys = [f"up/{rank}" for rank in range(1, size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = workers.dead()
        if dead:
            raise WorkerDiedError(f"tensor-parallel worker failed to start: {'; '.join(dead)} "
                                  "(its error is printed above)")
        if time.monotonic() > deadline:
            late = [f"rank {r} (pid {workers.pids[r - 1]})" for r in range(1, size) if not store.check([f"up/{r}"])]
            raise WorkerStuckError(
                f"tensor-parallel worker stuck: {', '.join(late)} did not start within {timeout_s:g} s "
                "(tp_setup_timeout_s, --tp-setup-timeout-s); its workers were killed. A worker only imports torch "
                "and connects to rank 0 here: look for a stopped process or an overloaded machine.")
        time.sleep(0.01)


# This worker's NCCL group, aborted on the way out: rank 0 aborts its own at the same time, and NCCL's
# abort waits for the node's other ranks (distributed.NCCL_ABORT_WAIT_S).
_NCCL_GROUP: list = []


def _exit(code: int) -> None:
    for group in _NCCL_GROUP:
        abort_within(group, NCCL_ABORT_WAIT_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_when_rank0_is_gone() -> None:
    # Rank 0 closes our stdin to stop us (or the OS closes it when rank 0
    # dies): exit at once, whatever the main thread is waiting on.
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        _exit(0)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    threading.Thread(target=_exit_when_rank0_is_gone, name="rank0-watch", daemon=True).start()
    rank, size = spec["rank"], spec["size"]
    board = ProgressBoard(size, fd=spec["board_fd"])
    board.start_heartbeat(rank)
    # Ctrl-C and Slurm's SIGTERM reach every process of the job: rank 0 handles
    # them (the job runner commits finished rows first), and its exit ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig.from_dict(spec["config"])
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])

    from .model_runner import ModelRunner, resolve_device
    from .models.config import ModelArgs

    device = resolve_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = torch.distributed.TCPStore(_HOST, spec["port"], size, False,
                                       timeout=timedelta(seconds=config.tp_setup_timeout_s))
    store.set(f"up/{rank}", "1")
    code = 0
    try:
        group = TPGroup(rank, size, device, store, board)
        if group.data is not group.control:
            _NCCL_GROUP.append(group.data)
        runner = ModelRunner(config, ModelArgs.from_dir(config.model), device, spec["max_model_len"], set(), tp=group)
    except Exception:
        print(f"[pagedbatch] tensor-parallel worker rank {rank} failed to set up:", file=sys.stderr)
        traceback.print_exc()
        code = 1
    else:
        try:
            runner.serve()  # returns never: the stdin watch ends the process
        except Exception as e:  # rank 0 is gone (its error is the one to read)
            print(f"[pagedbatch] tensor-parallel worker rank {rank} stops: {type(e).__name__}: {e}",
                  file=sys.stderr)
            code = 1
    # Exit without destroying the groups (a gloo or NCCL group destroyed with a dead peer can hang or
    # abort); only NCCL's communicator is aborted, with a deadline.
    _exit(code)


if __name__ == "__main__":
    main()
