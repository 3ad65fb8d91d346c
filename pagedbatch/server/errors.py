"""Request errors: what went wrong, which field, and the HTTP status to answer with.

The JSON body follows OpenAI's error shape so the ``openai`` client reports
it as is: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

from typing import Any, Optional


class RequestError(Exception):
    """A request the server will not run: answered with ``status`` and a body naming ``param``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error", code: Any = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type
        self.code = status if code is None else code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: Optional[str] = None, type: str = "invalid_request_error",
               code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sampling_error(e: ValueError) -> RequestError:
    """A SamplingParams ValueError as a RequestError; its messages begin with the field's name."""
    from ..sampling_params import SamplingParams

    message = str(e)
    first = message.split(" ", 1)[0]
    fields = SamplingParams.__dataclass_fields__
    return RequestError(message, first if first in fields else None)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nothing is sent back."""
