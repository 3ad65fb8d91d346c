"""A tensor-parallel worker that is alive but stuck fails rank 0 within the timeout, naming it; a slow one does not."""
import os
import re
import signal
import threading
import time

import pytest
import torch

from pagedbatch import EngineConfig, InferenceEngine, SamplingParams
from pagedbatch.engine import tp_watch
from pagedbatch.engine.distributed import WorkerStuckError
from pagedbatch.engine.tp_watch import ProgressBoard
from test_tp_workers import alive, wait_gone

SMALL = dict(device="cpu", dtype="float32", num_kv_blocks=32)
ON = {"cpu": SMALL, "cuda": dict(device="cuda", num_kv_blocks=32)}
PROMPTS = [[3, 4, 5], [6, 7, 8, 9]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MARGIN_S = 2.0  # scheduling slack on a loaded two-core machine
TWO_GPUS = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def named_ranks(message: str) -> set[int]:
    return {int(r) for r in re.findall(r"rank (\d+) \(pid", message)}


@pytest.mark.parametrize("device,size", [("cpu", 2), ("cpu", 4), pytest.param("cuda", 2, marks=TWO_GPUS)])
def test_a_stopped_worker_fails_rank0_within_the_timeout_naming_only_it_and_no_worker_survives(
        tiny_model, device, size):
    # Rank 1 stopped while idle: it entered the next step's broadcast, so only its heartbeat
    # gives it away. With four ranks, rank 3 waits behind it in gloo's broadcast tree: not named.
    engine = InferenceEngine(tiny_model("llama"), **ON[device], tensor_parallel_size=size, tp_timeout_s=3)
    engine.generate(PROMPTS, GREEDY)
    pids = engine.engine.tp.workers.pids
    os.kill(pids[0], signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(WorkerStuckError) as err:
        engine.generate(PROMPTS, GREEDY)
    took = time.monotonic() - start
    assert 3.0 - 0.1 < took < 3.0 + MARGIN_S
    message = str(err.value)
    assert named_ranks(message) == {1}, message
    assert "waited 3 s in step" in message
    assert "tp_timeout_s (--tp-timeout-s)" in message and f"rank 1 (pid {pids[0]}) has not run for" in message
    assert wait_gone(pids, timeout=2.0) == []  # killed, the stopped one too
    with pytest.raises(WorkerStuckError):  # and it stays failed, without waiting again
        engine.generate(PROMPTS, GREEDY)
    engine.shutdown()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_a_worker_paused_for_less_than_the_timeout_only_delays_the_step(tiny_model, device):
    engine = InferenceEngine(tiny_model("llama"), **ON[device], tensor_parallel_size=2, tp_timeout_s=5)
    want = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    pid = engine.engine.tp.workers.pids[0]
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(1.5, os.kill, (pid, signal.SIGCONT)).start()
    start = time.monotonic()
    got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert time.monotonic() - start >= 1.4  # it did wait for the paused worker
    assert got == want
    assert alive(pid)
    engine.shutdown()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_the_watchdog_fails_rank0_blocked_outside_its_own_waits_and_unblocks_it_by_killing_the_workers(
        tiny_model, monkeypatch, device):
    # As an NCCL launch stuck behind a hung collective would: rank 0 blocks in a call that
    # has no deadline and returns only once the workers are gone.
    engine = InferenceEngine(tiny_model("llama"), **ON[device], tensor_parallel_size=2, tp_timeout_s=2)
    engine.generate(PROMPTS, GREEDY)
    tp = engine.engine.tp
    worker = tp.workers.procs[0]
    compute_logits = engine.engine.runner.model.compute_logits

    def blocked(hidden):
        worker.wait()
        return compute_logits(hidden)

    monkeypatch.setattr(engine.engine.runner.model, "compute_logits", blocked)
    start = time.monotonic()
    with pytest.raises(WorkerStuckError, match=r"blocked outside its own waits") as err:
        engine.generate(PROMPTS, GREEDY)
    assert 2.0 < time.monotonic() - start < 2.0 + 1.0 + MARGIN_S  # timeout + the watchdog's margin
    assert "waited 2 s in step" in str(err.value)
    assert wait_gone(tp.workers.pids) == []
    engine.shutdown()


def test_gpu_work_that_never_finishes_fails_rank0_within_the_timeout_blaming_no_running_worker(tiny_model):
    # The NCCL path's wait, exercised on the CPU: rank 0 polls a CUDA event; here one that never
    # completes, as when a collective hangs on the GPUs although every worker's host is fine.
    class NeverDone:
        def query(self):
            return False

    engine = InferenceEngine(tiny_model("llama"), **SMALL, tensor_parallel_size=2, tp_timeout_s=1)
    engine.generate(PROMPTS, GREEDY)
    tp = engine.engine.tp
    start = time.monotonic()
    with pytest.raises(WorkerStuckError) as err:
        tp.wait_event(NeverDone())
    assert 1.0 <= time.monotonic() - start < 1.0 + MARGIN_S
    message = str(err.value)
    assert named_ranks(message) == set()
    assert "waited 1 s in step" in message and "for the GPUs to finish the queued work" in message
    assert "every worker (rank 1) reached it and is running" in message
    assert wait_gone(tp.workers.pids) == []
    engine.shutdown()


def test_a_worker_stuck_before_it_starts_fails_the_engine_within_the_setup_timeout(tiny_model, monkeypatch):
    from pagedbatch.engine import tp_workers

    started = []

    def start_stopped(*args, **kw):
        proc = popen(*args, **kw)
        os.kill(proc.pid, signal.SIGSTOP)  # still importing torch: it never reaches the store
        started.append(proc.pid)
        return proc

    popen = tp_workers.subprocess.Popen
    monkeypatch.setattr(tp_workers.subprocess, "Popen", start_stopped)
    model = tiny_model("llama")
    start = time.monotonic()
    with pytest.raises(WorkerStuckError, match=r"rank 1 \(pid \d+\) did not start within 1.5 s \(tp_setup_timeout_s"):
        InferenceEngine(model, **SMALL, tensor_parallel_size=2, tp_setup_timeout_s=1.5)
    assert time.monotonic() - start < 1.5 + MARGIN_S
    assert wait_gone(started, timeout=2.0) == []


def test_the_board_blames_workers_not_running_or_stuck_outside_the_collectives_not_those_waiting(monkeypatch):
    board = ProgressBoard(4)
    for rank in range(4):
        board.beat(rank)
    for rank, entered, finished in [(1, 9, 9), (2, 10, 9), (3, 9, 8)]:
        board.entered(rank, entered)
        board.finished(rank, finished)
    # Rank 0 waits in its 10th collective: rank 1 never came (busy or blocked in its own code),
    # rank 2 is in it, rank 3 waits in the 9th (on rank 1, say).
    assert board.laggards(10) == {1: "has not reached it: it is busy or blocked after collective 9 of 10"}
    board.entered(1, 10)
    assert board.laggards(10) == {3: "is still waiting in collective 9 of 10"}  # no one else to name
    board.entered(3, 10)
    assert board.laggards(10) == {}
    monkeypatch.setattr(tp_watch, "_STALE_S", 0.05)
    time.sleep(0.1)
    board.beat(1)
    board.beat(3)
    assert list(board.laggards(10)) == [2]
    assert board.laggards(10)[2].startswith("has not run for 0.1 s")


@pytest.mark.parametrize("field", ["tp_timeout_s", "tp_setup_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "300"])
def test_tp_timeouts_must_be_positive_finite_seconds(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a number of seconds > 0"):
        EngineConfig(model="m", **{field: value})
