"""The one background thread that owns the engine and serves every HTTP request.

The engine is not thread-safe, so nothing else touches it (tokenizer
included): HTTP handlers post commands (submit, abort) to a queue, and the
thread applies them between steps, which is what makes requests from many
clients share each step (continuous batching). Each request's events go back
through the ``sink`` it came with; the HTTP side's sink hops onto the
asyncio loop. With nothing to run the thread blocks on the queue.
"""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from .admission import Accepted, Submission, admit
from .errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class EngineLoop:
    """Runs ``engine`` (an LLMEngine) on a dedicated thread.

    ``submit`` and ``abort`` may be called from any thread. A submission's
    sink receives, on the engine thread, first ``Accepted`` or a
    ``RequestError``, then ``RequestOutput``s until one is finished (with
    ``n`` > 1: until each sample has finished) or a ``RequestError`` if the
    engine fails. An aborted request gets nothing more.
    """

    def __init__(self, engine, max_tokens_cap: Optional[int] = None):
        self.engine = engine
        self.max_tokens_cap = max_tokens_cap or engine.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[object], None]] = {}
        self._samples_left: dict[str, int] = {}  # requests with n > 1: samples not finished yet
        self._thread: Optional[threading.Thread] = None
        self._counts = {"accepted": 0, "rejected": 0, "aborted": 0, "finished": 0, "failed": 0}
        self._peak_running = 0
        self._stats: dict = {}
        self.error: Optional[str] = None  # set when the thread has died
        self._publish()

    # -- any thread ----------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pagedbatch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, submission: Submission) -> None:
        if not self.alive:
            submission.sink(RequestError("the engine is not running", status=503, type="server_error"))
            return
        self._commands.put(submission)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> dict:
        """Engine and request counters as of the last step (a snapshot; safe from any thread)."""
        return self._stats

    # -- the engine thread ---------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish()
        except BaseException:
            self.error = traceback.format_exc(limit=5)
            log.exception("the engine loop died")
        finally:
            reason = "the engine loop died" if self.error else "the server is shutting down"
            self._fail_all(RequestError(reason, status=503, type="server_error"))
            self._publish()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False when told to stop."""
        if block:
            self._publish()
            if not self._apply(self._commands.get()):
                return False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if not self._apply(command):
                return False

    def _apply(self, command) -> bool:
        if command is _STOP:
            return False
        if isinstance(command, _Abort):
            if self._close(command.request_id):
                self.engine.abort_request(command.request_id)  # frees its KV blocks now
                self._counts["aborted"] += 1
        else:
            self._add(command)
        return True

    def _add(self, sub: Submission) -> None:
        try:
            if sub.request_id in self._sinks:
                raise RequestError(f"request id {sub.request_id!r} is already in use")
            ids, params = admit(self.engine, sub, self.max_tokens_cap)
            self.engine.add_request(sub.request_id, ids, params, stream=sub.stream)
        except RequestError as e:
            self._counts["rejected"] += 1
            self._send(sub.request_id, sub.sink, e)
            return
        except ValueError as e:
            self._counts["rejected"] += 1
            self._send(sub.request_id, sub.sink, RequestError(str(e)))
            return
        except Exception as e:
            # An unforeseen failure admitting one request fails that request, never the loop (a prompt with a
            # lone surrogate once raised a TypeError here: the thread died and every later request got 503).
            log.exception("admitting request %s failed", sub.request_id)
            self._counts["rejected"] += 1
            self._send(sub.request_id, sub.sink, RequestError(f"could not admit the request: {type(e).__name__}: {e}",
                                                              status=500, type="server_error"))
            return
        self._counts["accepted"] += 1
        self._sinks[sub.request_id] = sub.sink
        if params.n > 1:
            self._samples_left[sub.request_id] = params.n
        self._send(sub.request_id, sub.sink, Accepted(len(ids), params.max_tokens))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # One bad step must not take the server down: fail what was running and carry on.
            log.exception("engine step failed; failing the %d running request(s)", len(self._sinks))
            self._fail_all(RequestError(f"the engine failed: {type(e).__name__}: {e}", status=500,
                                        type="server_error"))
            return
        self._peak_running = max(self._peak_running, len(self.engine.scheduler.running))
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished and not self._one_sample_finished(out.request_id):
                self._close(out.request_id)
                self._counts["finished"] += 1
            self._send(out.request_id, sink, out)

    def _one_sample_finished(self, request_id: str) -> bool:
        """Count a finished sample; True while others of its request are still running."""
        left = self._samples_left.get(request_id, 1) - 1
        if left:
            self._samples_left[request_id] = left
        return left > 0

    def _close(self, request_id: str) -> bool:
        """Forget a request's sink; False if it had none (already finished or aborted)."""
        self._samples_left.pop(request_id, None)
        return self._sinks.pop(request_id, None) is not None

    def _send(self, request_id: str, sink, event) -> None:
        try:
            sink(event)
        except Exception:
            # The receiver is gone (its event loop closed): nobody will read this request.
            log.warning("could not deliver an event for %s; aborting it", request_id, exc_info=True)
            if self._close(request_id):
                self.engine.abort_request(request_id)
                self._counts["aborted"] += 1

    def _fail_all(self, error: RequestError) -> None:
        sinks, self._sinks = self._sinks, {}
        self._samples_left = {}
        for request_id, sink in sinks.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("could not abort %s", request_id)
            self._counts["failed"] += 1
            self._send(request_id, sink, error)

    def _publish(self) -> None:
        try:
            stats = self.engine.stats()
            stats["num_unfinished"] = self.engine.num_unfinished_requests()
        except Exception as e:  # stats must never be what kills the loop
            stats = {"stats_error": f"{type(e).__name__}: {e}"}
        stats["active_requests"] = len(self._sinks)
        stats["peak_running"] = self._peak_running
        stats.update({f"requests_{k}": v for k, v in self._counts.items()})
        self._stats = stats  # replaced whole: readers on other threads see one consistent dict
