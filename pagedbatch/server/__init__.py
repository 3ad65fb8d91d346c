"""The HTTP server: one engine behind FastAPI, shared by every client.

``api_server.py`` (or ``pagedbatch.server.cli.serve``) starts it; see
docs/server.md. Modules: ``engine_loop`` (the thread that owns the engine),
``admission`` (what may join the batch), ``requests`` (the asyncio side of a
request), ``protocol`` (bodies and their checks), ``native_routes`` and
``openai_routes`` (the endpoints), ``sse`` (streaming), ``app`` (wiring).
"""
from __future__ import annotations

import importlib

__all__ = ["create_app", "EngineLoop", "ServerSettings"]
_HOMES = {"create_app": ".app", "EngineLoop": ".engine_loop", "ServerSettings": ".settings"}


def __getattr__(name: str):
    # Resolved on first use: the command line imports .cli and .settings for every command (run_batch.py
    # included), and importing FastAPI with them cost each start ~0.4 s.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
