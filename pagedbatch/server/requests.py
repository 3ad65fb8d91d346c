"""The asyncio side of engine requests: submit, await admission, read outputs, abort.

One HTTP request may need several engine requests (a list of prompts), so
they travel as a ``RequestGroup`` whose events share one asyncio queue.
With ``n`` > 1 each engine request gives n samples; the group numbers its
outputs as OpenAI numbers choices: prompt index * n + sample index. The
engine thread's sink hops each event onto the event loop with
``call_soon_threadsafe``. Whatever way a handler ends (done, error, client
gone, cancelled), ``abort()`` runs and the engine frees the unfinished
requests' KV blocks.
"""
from __future__ import annotations

import asyncio
import uuid
from collections import deque
from typing import Any, AsyncIterator, Optional, Union

from ..engine.outputs import RequestOutput
from ..sampling_params import SamplingParams
from .admission import Accepted, Submission
from .engine_loop import EngineLoop
from .errors import ClientDisconnected, RequestError

# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class RequestGroup:
    """Engine requests ``{id}-0`` ... ``{id}-{k-1}``, one per prompt, each with ``n`` samples, read together."""

    def __init__(self, engine_loop: EngineLoop, group_id: str, num_prompts: int, n: int = 1):
        self.engine_loop = engine_loop
        self.id = group_id
        self.n = n
        self.request_ids = [f"{group_id}-{i}" for i in range(num_prompts)]
        self.prompt_tokens = [0] * num_prompts
        self._queue: asyncio.Queue = asyncio.Queue()
        self._early: deque = deque()  # outputs that arrived while others were still being admitted
        self._open = dict.fromkeys(range(num_prompts), n)  # submitted prompt -> its samples not finished

    @property
    def num_choices(self) -> int:
        return len(self.request_ids) * self.n

    @classmethod
    async def start(cls, engine_loop: EngineLoop, group_id: str, prompts: list[Union[str, list[int], None]],
                    params: SamplingParams, *, max_tokens: Optional[int], default_max_tokens: Optional[int],
                    stream: bool, messages: Optional[list[dict[str, Any]]] = None,
                    structured_field: str = "response_format",
                    max_tokens_field: str = "max_tokens") -> "RequestGroup":
        """Submit one request per prompt (or one chat) and wait until all are admitted.

        Raises the first RequestError (and aborts the others) if any is refused.
        """
        num_prompts = 1 if messages is not None else len(prompts)
        group = cls(engine_loop, group_id, num_prompts, params.n)
        loop = asyncio.get_running_loop()
        for i, rid in enumerate(group.request_ids):
            def sink(event, i=i):
                loop.call_soon_threadsafe(group._queue.put_nowait, (i, event))

            engine_loop.submit(Submission(
                request_id=rid, prompt=None if messages is not None else prompts[i], messages=messages,
                params=params, max_tokens=max_tokens, default_max_tokens=default_max_tokens, stream=stream,
                sink=sink, structured_field=structured_field, max_tokens_field=max_tokens_field))
        pending = set(range(num_prompts))
        try:
            while pending:
                i, event = await group._queue.get()
                if isinstance(event, Accepted):
                    group.prompt_tokens[i] = event.prompt_tokens
                    pending.discard(i)
                elif isinstance(event, RequestError):
                    group._open.pop(i, None)
                    raise event
                else:
                    group._early.append((i, event))
        except BaseException:
            group.abort()
            raise
        return group

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, until every sample has finished.

        The choice index is prompt index * n + sample index (with n = 1, the prompt index).
        """
        while self._open:
            i, event = self._early.popleft() if self._early else await self._queue.get()
            if isinstance(event, RequestError):
                self._open.pop(i, None)
                raise event
            if event.finish_reason == "error":
                self._open.pop(i, None)
                raise RequestError(event.error or "the request failed", "max_tokens")
            if event.finished:
                self._open[i] -= 1
                if not self._open[i]:
                    del self._open[i]
            yield i * self.n + event.sample_index, event

    async def results(self, http_request=None) -> list[RequestOutput]:
        """The finished output of every choice, in choice order; ClientDisconnected if the client leaves first."""
        finals: list[Optional[RequestOutput]] = [None] * self.num_choices

        async def collect() -> None:
            async for i, out in self.events():
                if out.finished:
                    finals[i] = out

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return finals  # type: ignore[return-value]
                if http_request is not None and await http_request.is_disconnected():
                    raise ClientDisconnected()
        finally:
            if not task.done():
                task.cancel()
            self.abort()

    def abort(self) -> None:
        """Abort every request with samples not yet finished (idempotent)."""
        for i in sorted(self._open):
            self.engine_loop.abort(self.request_ids[i])
        self._open.clear()
