"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Shapes follow OpenAI's API closely enough that the official ``openai``
client works unchanged, streaming or not. A list of prompts gives one
choice per prompt, ``n`` gives n per prompt: choice ``index`` is prompt
index * n + sample index, and each prompt is computed once for its n.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine.outputs import RequestOutput
from .native_routes import usage
from .protocol import ChatCompletionRequest, CompletionRequest, chat_messages, check_model, read_json
from .requests import RequestGroup, new_id
from .sse import stream_group

router = APIRouter(prefix="/v1")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _model_card(request: Request) -> dict:
    settings = request.app.state.settings
    return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "pagedbatch",
            "max_model_len": request.app.state.engine_loop.engine.max_model_len}


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(request)]})


@router.get("/models/{model:path}")
async def model(request: Request, model: str) -> JSONResponse:
    """OpenAI's retrieve-model route (``client.models.retrieve(name)``)."""
    settings = request.app.state.settings
    check_model(model, settings.model_name, settings.aliases)
    return JSONResponse(_model_card(request))


@router.post("/completions")
async def completions(request: Request):
    settings = request.app.state.settings
    req = await read_json(request, CompletionRequest, settings.max_body_bytes)
    check_model(req.model, settings.model_name, settings.aliases)
    req.refuse_unsupported()
    prompts = req.prompts()
    group = await RequestGroup.start(
        request.app.state.engine_loop, new_id("cmpl"), prompts, req.sampling_params(), max_tokens=req.max_tokens,
        default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS, stream=req.stream, structured_field=req.structured_field())
    head = {"id": group.id, "object": "text_completion", "created": int(time.time()), "model": settings.model_name}
    if not req.stream:
        outs = await group.results(request)
        return JSONResponse({**head, "choices": [
            {"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
            for i, o in enumerate(outs)], "usage": _usage(group, outs)})

    finals: list[Optional[RequestOutput]] = [None] * group.num_choices

    def render(i: int, out: RequestOutput):
        if out.finished:
            finals[i] = out
        elif not out.new_text:
            return  # a token whose text is held back (half a character): nothing to show yet
        yield {**head, "choices": [{"index": i, "text": out.new_text, "logprobs": None,
                                    "finish_reason": out.finish_reason if out.finished else None}]}

    return stream_group(group, render, lambda: _usage_chunk(head, req, group, finals))


@router.post("/chat/completions")
async def chat_completions(request: Request):
    settings = request.app.state.settings
    req = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
    check_model(req.model, settings.model_name, settings.aliases)
    req.refuse_unsupported()
    group = await RequestGroup.start(
        request.app.state.engine_loop, new_id("chatcmpl"), [None], req.sampling_params(),
        max_tokens=req.requested_max_tokens(), default_max_tokens=None, stream=req.stream,
        messages=chat_messages(req.messages), structured_field=req.structured_field(),
        max_tokens_field="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    head = {"id": group.id, "created": int(time.time()), "model": settings.model_name}
    if not req.stream:
        outs = await group.results(request)
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
             "finish_reason": o.finish_reason} for i, o in enumerate(outs)], "usage": _usage(group, outs)})

    finals: list[Optional[RequestOutput]] = [None] * group.num_choices
    head = {**head, "object": "chat.completion.chunk"}
    started: set[int] = set()

    def render(i: int, out: RequestOutput):
        if i not in started:  # OpenAI's first chunk of each choice names the role
            started.add(i)
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        if out.new_text:
            yield {**head, "choices": [{"index": i, "delta": {"content": out.new_text}, "logprobs": None,
                                        "finish_reason": None}]}
        if out.finished:
            finals[i] = out
            yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": out.finish_reason}]}

    return stream_group(group, render, lambda: _usage_chunk(head, req, group, finals))


def _usage(group: RequestGroup, outs: list[RequestOutput]) -> dict[str, int]:
    return usage(sum(group.prompt_tokens), sum(o.output_tokens for o in outs))


def _usage_chunk(head: dict[str, Any], req, group: RequestGroup, finals: list) -> list[dict[str, Any]]:
    if req.stream_options is None or not req.stream_options.include_usage:
        return []
    return [{**head, "choices": [], "usage": _usage(group, [o for o in finals if o is not None])}]
