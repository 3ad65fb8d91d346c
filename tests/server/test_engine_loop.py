"""The engine thread: a failing step fails only the requests it was running, and an idle loop sleeps."""
from __future__ import annotations

import time

import httpx

OK = {"prompt": "dog hello 42", "max_tokens": 4, "temperature": 0}


def _fail_next_step(server, monkeypatch):
    engine = server.engine_loop.engine
    real_step = engine.step

    def failing_step():
        monkeypatch.setattr(engine, "step", real_step)  # only this once
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "step", failing_step)


def test_an_engine_failure_fails_its_requests_with_a_500_and_the_server_carries_on(server, monkeypatch):
    _fail_next_step(server, monkeypatch)
    r = httpx.post(server.url + "/generate", json=OK, timeout=30)
    assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", json=OK, timeout=30)
    assert r.status_code == 200
    stats = server.wait_idle()
    assert stats["requests_failed"] == 1 and stats["free_blocks"] == stats["num_blocks"]
    assert server.health()["status"] == "ok"


def test_an_engine_failure_mid_stream_ends_the_stream_with_an_error_event(server, monkeypatch):
    with httpx.stream("POST", server.url + "/generate_stream", json={**OK, "max_tokens": 400, "ignore_eos": True},
                      timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert '"token_ids"' in first
        _fail_next_step(server, monkeypatch)
        rest = [line for line in lines if line]
    assert '"error"' in rest[-2] and "simulated kernel failure" in rest[-2]
    assert rest[-1] == "data: [DONE]"
    assert server.wait_idle()["free_blocks"] == server.stats()["num_blocks"]


def test_an_idle_engine_loop_waits_instead_of_spinning(server):
    server.wait_idle()
    steps = server.stats()["steps"]
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.1  # all threads of this process together
    assert server.stats()["steps"] == steps
