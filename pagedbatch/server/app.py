"""The FastAPI application: routes, error answers, and the engine thread's lifetime."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..engine.token_bytes import TokenBytes
from .engine_loop import EngineLoop
from .errors import ClientDisconnected, RequestError, error_body
from .settings import ServerSettings

log = logging.getLogger(__name__)


def create_app(engine_loop: EngineLoop, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine_loop``; the loop's thread starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    from . import native_routes, openai_routes

    app = FastAPI(title="pagedbatch", version=__version__, lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.settings = settings
    # Logprobs on the OpenAI routes name their tokens: every token's bytes, looked up now, before the engine
    # thread (which owns the tokenizer) starts.
    tokenizer = getattr(engine_loop.engine, "tokenizer", None)
    app.state.token_bytes = TokenBytes(tokenizer).preload() if tokenizer is not None else None
    app.include_router(native_routes.router)
    app.include_router(openai_routes.router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in the same error shape as everything else.
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"),
                            status_code=500)

    return app
