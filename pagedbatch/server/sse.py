"""Server-sent events: ``data: {json}`` lines, ending with ``data: [DONE]``."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Iterable

from starlette.responses import StreamingResponse

from ..engine.outputs import RequestOutput
from .errors import RequestError
from .requests import RequestGroup

DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def stream_group(group: RequestGroup, render: Callable[[int, RequestOutput], Iterable[Any]],
                 closing: Callable[[], Iterable[Any]] = lambda: ()) -> StreamingResponse:
    """Stream a started group: ``render`` turns each output into events, ``closing`` adds the last ones.

    An error after the stream began cannot change the status code any more,
    so it goes out as an ``{"error": ...}`` event (the openai client raises it).
    When the client disconnects the generator is cancelled and its requests aborted.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for i, out in group.events():
                for obj in render(i, out):
                    yield sse_event(obj)
            for obj in closing():
                yield sse_event(obj)
        except RequestError as e:
            yield sse_event(e.body())
        finally:
            group.abort()
        yield DONE

    # X-Accel-Buffering: a proxy (nginx) in front must pass events on as they come.
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
