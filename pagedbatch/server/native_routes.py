"""pagedbatch's own routes: ``GET /health``, ``POST /generate``, ``POST /generate_stream``.

With ``n`` > 1, ``/generate`` answers ``{"id", "object", "model", "samples":
[...], "usage"}``, each sample holding the fields an n=1 answer has plus
``sample_index``; streamed events carry ``sample_index``. With n = 1 nothing
changes.
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine.outputs import RequestOutput
from .errors import RequestError
from .protocol import GenerateRequest, chat_messages, check_model, read_json
from .requests import RequestGroup, new_id
from .sse import stream_group

router = APIRouter()

DEFAULT_MAX_TOKENS = 256  # SamplingParams' default; shrunk to fit the context when not given


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 with the model and the engine's counters while the engine thread runs, else 503."""
    loop, settings = request.app.state.engine_loop, request.app.state.settings
    ok = loop.alive
    body = {"status": "ok" if ok else "error", "model": settings.model_name,
            "max_model_len": loop.engine.max_model_len, "engine": loop.stats()}
    if loop.error:
        body["error"] = loop.error
    return JSONResponse(body, status_code=200 if ok else 503)


@router.post("/generate")
async def generate(request: Request):
    """JSON with the text, finish_reason and token counts; with ``"stream": true``, as /generate_stream."""
    return await _generate(request, stream=None)


@router.post("/generate_stream")
async def generate_stream(request: Request):
    """The text as it is generated, as server-sent events, then ``data: [DONE]``."""
    return await _generate(request, stream=True)


async def _generate(request: Request, stream: Optional[bool]):
    settings = request.app.state.settings
    req = await read_json(request, GenerateRequest, settings.max_body_bytes)
    check_model(req.model, settings.model_name, settings.aliases)
    if (req.prompt is None) == (req.messages is None):
        raise RequestError("give exactly one of 'prompt' (text or token ids) and 'messages' (chat)", "prompt")
    params = req.sampling_params(logprobs=req.logprobs)
    stream = req.stream if stream is None else stream
    group = await RequestGroup.start(
        request.app.state.engine_loop, new_id("gen"), [req.prompt], params, max_tokens=req.max_tokens,
        default_max_tokens=DEFAULT_MAX_TOKENS, stream=stream,
        messages=chat_messages(req.messages) if req.messages is not None else None,
        structured_field=req.structured_field())
    name = settings.model_name
    several = params.n > 1
    if not stream:
        outs = await group.results(request)
        head = {"id": group.id, "object": "generation", "model": name}
        if several:
            return JSONResponse({**head, "samples": [{"sample_index": o.sample_index, **_answer(o)} for o in outs],
                                 "usage": usage(group.prompt_tokens[0], sum(o.output_tokens for o in outs))})
        return JSONResponse({**head, **_answer(outs[0])})
    sent_logprobs = [0] * params.n

    def render(i: int, out: RequestOutput):
        event: dict[str, Any] = {"id": group.id, "object": "generation.chunk", "model": name,
                                 **({"sample_index": out.sample_index} if several else {}),
                                 "text": out.new_text, "token_ids": out.new_token_ids, "finish_reason": None,
                                 **_logprobs(out, sent_logprobs[i], len(out.new_token_ids))}
        sent_logprobs[i] += len(out.new_token_ids)
        if out.finished:
            event.update(_final_fields(out))
        yield event

    return stream_group(group, render)


def _answer(out: RequestOutput) -> dict[str, Any]:
    return {"text": out.text, "token_ids": out.token_ids, **_final_fields(out), **_logprobs(out, 0, len(out.token_ids))}


def _final_fields(out: RequestOutput) -> dict[str, Any]:
    t = out.timings
    return {
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "usage": usage(out.prompt_tokens, out.output_tokens),
        "timings": {"queue_s": t.queue_s, "ttft_s": t.ttft_s, "latency_s": t.latency_s, "tpot_s": out.tpot_s},
    }


def _logprobs(out: RequestOutput, start: int, count: int) -> dict[str, Any]:
    # The engine keeps appending to out.logprobs (one list per request), so take exactly this output's tokens.
    if out.logprobs is None:
        return {}
    return {"logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                         for lp in out.logprobs[start:start + count]]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
