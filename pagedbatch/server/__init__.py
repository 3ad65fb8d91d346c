"""The HTTP server: one engine behind FastAPI, shared by every client.

``api_server.py`` (or ``pagedbatch.server.cli.serve``) starts it; see
docs/server.md. Modules: ``engine_loop`` (the thread that owns the engine),
``admission`` (what may join the batch), ``requests`` (the asyncio side of a
request), ``protocol`` (bodies and their checks), ``native_routes`` and
``openai_routes`` (the endpoints), ``sse`` (streaming), ``app`` (wiring).
"""
from .app import create_app
from .engine_loop import EngineLoop
from .settings import ServerSettings

__all__ = ["create_app", "EngineLoop", "ServerSettings"]
