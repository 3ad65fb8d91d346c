"""A real server for the tests: uvicorn on a free loopback port, in a background thread.

Each test module gets its own server (its engine counters start at zero);
the offline engine that gives the reference outputs is shared.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest

from pagedbatch import EngineConfig, InferenceEngine
from pagedbatch.engine.llm_engine import LLMEngine
from pagedbatch.server import EngineLoop, ServerSettings, create_app

MODEL_NAME = "tiny-llama"
# Long enough that a request can run for a second on a CPU (the disconnect tests need one still running).
MAX_POSITIONS = 2048
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=512)


@dataclass
class Server:
    url: str
    engine_loop: EngineLoop
    settings: ServerSettings

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict:
        return self.health()["engine"]

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Engine stats once no request is left (the engine applies aborts between steps)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["active_requests"] == 0 and stats["num_unfinished"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still running after {timeout}s: {stats}")
            time.sleep(0.02)


def start_server(model_dir: str, **settings) -> tuple[Server, Callable[[], None]]:
    import uvicorn

    engine = LLMEngine(EngineConfig(model=model_dir, **ENGINE))
    server_settings = ServerSettings(model_name=MODEL_NAME, aliases=(model_dir,), **settings)
    app = create_app(EngineLoop(engine, server_settings.max_tokens_cap), server_settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)
        sock.close()

    return Server(f"http://127.0.0.1:{port}", app.state.engine_loop, server_settings), stop


@pytest.fixture(scope="session")
def model_dir(tiny_model) -> str:
    return tiny_model("llama", max_position_embeddings=MAX_POSITIONS)


@pytest.fixture(scope="module")
def server(model_dir):
    srv, stop = start_server(model_dir, max_body_bytes=64 * 1024)
    yield srv
    stop()


@pytest.fixture(scope="session")
def offline(model_dir) -> InferenceEngine:
    """The same model run offline: the reference every server answer is compared with."""
    return InferenceEngine(model_dir, **ENGINE)
