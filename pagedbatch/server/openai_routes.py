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
from ..openai_logprobs import chat_logprobs, completion_logprobs
from .errors import RequestError
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
    logprobs = req.engine_logprobs()
    token_bytes = _token_bytes(request, logprobs)
    group = await RequestGroup.start(
        request.app.state.engine_loop, new_id("cmpl"), prompts, req.sampling_params(logprobs=logprobs),
        max_tokens=req.max_tokens,
        default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS, stream=req.stream, structured_field=req.structured_field())
    head = {"id": group.id, "object": "text_completion", "created": int(time.time()), "model": settings.model_name}
    if not req.stream:
        outs = await group.results(request)
        return JSONResponse({**head, "choices": [
            {"index": i, "text": o.text,
             "logprobs": completion_logprobs(o.logprobs or [], token_bytes)[0] if token_bytes else None,
             "finish_reason": o.finish_reason} for i, o in enumerate(outs)], "usage": _usage(group, outs)})

    finals: list[Optional[RequestOutput]] = [None] * group.num_choices
    sent = _SentLogprobs(group.num_choices)

    def render(i: int, out: RequestOutput):
        if out.finished:
            finals[i] = out
        elif not out.new_text:
            return  # a token whose text is held back (half a character): its logprobs go with the next chunk
        chunk_logprobs = None
        if token_bytes:
            chunk_logprobs, sent.offset[i] = completion_logprobs(sent.take(i, out), token_bytes, sent.offset[i])
        yield {**head, "choices": [{"index": i, "text": out.new_text, "logprobs": chunk_logprobs,
                                    "finish_reason": out.finish_reason if out.finished else None}]}

    return stream_group(group, render, lambda: _usage_chunk(head, req, group, finals))


@router.post("/chat/completions")
async def chat_completions(request: Request):
    settings = request.app.state.settings
    req = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
    check_model(req.model, settings.model_name, settings.aliases)
    req.refuse_unsupported()
    logprobs = req.engine_logprobs()
    token_bytes = _token_bytes(request, logprobs)
    group = await RequestGroup.start(
        request.app.state.engine_loop, new_id("chatcmpl"), [None], req.sampling_params(logprobs=logprobs),
        max_tokens=req.requested_max_tokens(), default_max_tokens=None, stream=req.stream,
        messages=chat_messages(req.messages), structured_field=req.structured_field(),
        max_tokens_field="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    head = {"id": group.id, "created": int(time.time()), "model": settings.model_name}
    if not req.stream:
        outs = await group.results(request)
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": o.text},
             "logprobs": chat_logprobs(o.logprobs or [], token_bytes) if token_bytes else None,
             "finish_reason": o.finish_reason} for i, o in enumerate(outs)], "usage": _usage(group, outs)})

    finals: list[Optional[RequestOutput]] = [None] * group.num_choices
    head = {**head, "object": "chat.completion.chunk"}
    started: set[int] = set()
    sent = _SentLogprobs(group.num_choices)

    def chunk_logprobs(i: int, out: RequestOutput):
        entries = sent.take(i, out) if token_bytes else []
        return chat_logprobs(entries, token_bytes) if entries else None

    def render(i: int, out: RequestOutput):
        if i not in started:  # OpenAI's first chunk of each choice names the role
            started.add(i)
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        if out.new_text:
            yield {**head, "choices": [{"index": i, "delta": {"content": out.new_text},
                                        "logprobs": chunk_logprobs(i, out), "finish_reason": None}]}
        if out.finished:
            finals[i] = out
            # Tokens that added no text (an end-of-turn token) keep their logprobs here.
            yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": chunk_logprobs(i, out),
                                        "finish_reason": out.finish_reason}]}

    return stream_group(group, render, lambda: _usage_chunk(head, req, group, finals))


class _SentLogprobs:
    """Per choice of a stream: how many tokens' logprobs were sent, and the completion text offset reached."""

    def __init__(self, num_choices: int):
        self.count = [0] * num_choices
        self.offset = [0] * num_choices

    def take(self, i: int, out: RequestOutput) -> list:
        # out.logprobs is the sample's whole list so far; a chunk carries those not sent yet.
        entries = (out.logprobs or [])[self.count[i]:len(out.token_ids)]
        self.count[i] += len(entries)
        return entries


def _token_bytes(request: Request, logprobs: Optional[int]):
    """The server's token-bytes table when the request asks for logprobs (they name each token)."""
    if logprobs is None:
        return None
    token_bytes = request.app.state.token_bytes
    if token_bytes is None:
        raise RequestError("logprobs name their tokens, and this server runs without a tokenizer", "logprobs")
    return token_bytes


def _usage(group: RequestGroup, outs: list[RequestOutput]) -> dict[str, int]:
    return usage(sum(group.prompt_tokens), sum(o.output_tokens for o in outs))


def _usage_chunk(head: dict[str, Any], req, group: RequestGroup, finals: list) -> list[dict[str, Any]]:
    if req.stream_options is None or not req.stream_options.include_usage:
        return []
    return [{**head, "choices": [], "usage": _usage(group, [o for o in finals if o is not None])}]
