"""Tensor-parallel worker processes: a dead worker fails rank 0 fast, and no worker outlives its engine."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from pagedbatch import InferenceEngine, SamplingParams
from pagedbatch.engine.distributed import WorkerDiedError

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SMALL = dict(device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=16)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                    reason="needs 2 CUDA GPUs")]),
])
def test_killing_a_worker_mid_generation_makes_rank0_fail_within_seconds_naming_it(tiny_model, device):
    engine = InferenceEngine(tiny_model("llama"), **{**SMALL, "device": device, "num_kv_blocks": 64})
    engine.generate([[3, 4, 5]], GREEDY)
    pid = engine.engine.tp.workers.pids[0]
    killed = []

    def kill_soon():
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        killed.append(time.monotonic())

    threading.Thread(target=kill_soon).start()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # runs well past the kill
    with pytest.raises(WorkerDiedError, match=rf"rank 1 \(pid {pid}\) was killed by signal 9"):
        engine.generate([[3, 4, 5], [6, 7, 8]], long)
    assert killed and time.monotonic() - killed[0] < 5.0
    with pytest.raises(WorkerDiedError):  # and it stays failed, without waiting on anything
        engine.generate([[3, 4, 5]], GREEDY)
    engine.shutdown()


def test_two_engines_side_by_side_then_shutdown_leaves_no_workers(tiny_model):
    d = tiny_model("llama")
    a, b = InferenceEngine(d, **SMALL), InferenceEngine(d, **SMALL)  # each its own rendezvous port
    pids = a.engine.tp.workers.pids + b.engine.tp.workers.pids
    assert all(alive(p) for p in pids)
    want = a.generate([[3, 4, 5], [6, 7]], GREEDY)
    assert [o.token_ids for o in b.generate([[3, 4, 5], [6, 7]], GREEDY)] == [o.token_ids for o in want]
    a.shutdown()
    assert wait_gone(a.engine.tp.workers.pids) == []
    assert all(alive(p) for p in b.engine.tp.workers.pids)
    with b:  # the context manager shuts it down
        b.generate([[8, 9]], GREEDY)
    assert wait_gone(pids) == []
    a.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        a.generate([[3, 4, 5]], GREEDY)


def test_rank0_failing_mid_step_stops_the_workers_instead_of_leaving_them_in_a_collective(tiny_model, monkeypatch):
    engine = InferenceEngine(tiny_model("llama"), **SMALL)
    engine.generate([[3, 4, 5]], GREEDY)

    def out_of_memory(hidden):
        raise MemoryError("no memory for the logits")

    monkeypatch.setattr(engine.engine.runner.model, "compute_logits", out_of_memory)
    with pytest.raises(MemoryError):
        engine.generate([[3, 4, 5]], GREEDY)
    assert wait_gone(engine.engine.tp.workers.pids) == []
    with pytest.raises(RuntimeError, match="stopped in the middle of a step .MemoryError"):
        engine.generate([[3, 4, 5]], GREEDY)
    engine.shutdown()


_RANK0 = """
import os, sys, time
from pagedbatch import InferenceEngine

def run(model_dir):
    engine = InferenceEngine(model_dir, device="cpu", tensor_parallel_size=2, num_kv_blocks=16)
    engine.generate([[3, 4, 5]], max_tokens=2, temperature=0)
    print("PIDS", *engine.engine.tp.workers.pids, flush=True)
    if sys.argv[2] == "exception":
        raise RuntimeError("rank 0 fails")
    time.sleep(600)  # until the test kills us

if __name__ == "__main__":
    if sys.argv[2] == "exception":
        # As a data-parallel replica would: rank 0 in a daemonic child process.
        import multiprocessing as mp
        child = mp.get_context("spawn").Process(target=run, args=(sys.argv[1],), daemon=True)
        child.start()
        child.join()
        sys.exit(child.exitcode)
    run(sys.argv[1])
"""


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_workers_end_when_rank0_dies(tiny_model, tmp_path, how):
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(_RANK0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), tiny_model("llama"), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line + proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        assert pids and all(alive(p) for p in pids)
        if how == "sigkill":
            proc.kill()
        assert proc.wait(timeout=60) != 0
        assert wait_gone(pids) == [], "worker processes outlived rank 0"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_group_abort_that_never_returns_is_left_behind_after_its_deadline():
    """NCCL's abort waits for the node's other ranks (a dead one never joins): teardown bounds the wait."""
    import threading
    import time

    from pagedbatch.engine.distributed import abort_within

    class Group:
        def __init__(self, blocks):
            self.blocks, self.aborted = blocks, threading.Event()

        def abort(self):
            self.aborted.set()
            if self.blocks:
                threading.Event().wait()  # like ncclCommAbort with a peer that exited

    t0 = time.monotonic()
    stuck = Group(blocks=True)
    assert abort_within(stuck, 0.2) is False and stuck.aborted.is_set()
    assert time.monotonic() - t0 < 2
    fine = Group(blocks=False)
    assert abort_within(fine, 5.0) is True and fine.aborted.is_set()
