"""`python api_server.py` (and `pagedbatch serve`) as a user runs it: a process that serves, answers curl-style requests, and
stops cleanly on Ctrl-C."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("entry", ["api_server.py", "pagedbatch serve"])
def test_api_server_script_serves_generate_and_stops_on_ctrl_c(model_dir, entry):
    port = _free_port()
    start = [sys.executable, str(REPO / "api_server.py")] if entry == "api_server.py" else \
        [sys.executable, "-c", "from pagedbatch.cli import main; main()", "serve"]
    cmd = [*start, "--model", model_dir, "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--served-model-name", "tiny",
           "--max-tokens-cap", "50", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/health").json()["model"] == "tiny"
        r = httpx.post(url + "/generate", content=b'{"prompt": "Hello, my name is", "max_tokens": 5}')
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = httpx.post(url + "/generate", json={"prompt": "Hello", "max_tokens": 51})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # --max-tokens-cap
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stdout.read()
