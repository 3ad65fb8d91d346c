#!/usr/bin/env python3
"""Serve a model over HTTP: ``python api_server.py [--model DIR] [--host 127.0.0.1] [--port 8000]``.

/generate, /generate_stream, /health and OpenAI-compatible /v1 routes on one
engine; see ``python api_server.py --help`` and docs/server.md.
"""
from pagedbatch.server.cli import serve

if __name__ == "__main__":
    serve(prog_name="api_server.py")
