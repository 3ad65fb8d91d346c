"""The Python API: ``InferenceEngine(model_path=...).generate(...)``."""
from __future__ import annotations

import collections
import itertools
import reprlib
from collections.abc import Iterable, Mapping, Set
from typing import Any, Iterator, Optional, Sequence, Union

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = Union[str, list[int], tuple[int, ...]]
_ids = itertools.count()
_ONE_PROMPT = "a string or a list (or tuple) of token ids"
_PROMPTS = f"{_ONE_PROMPT} for one prompt, or a list (or tuple) of such prompts for a batch"


def _describe(value: Any) -> str:
    return "None" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


def _is_token_ids(value: Any) -> bool:
    # A tuple is read as a list: ints make one prompt, anything else a batch.
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], int)


def _as_list(value: Any) -> Any:
    """A numpy array or torch tensor of token ids as nested Python lists (a 1-D one is one prompt, a 2-D one
    a batch); anything else as it is."""
    return value.tolist() if hasattr(value, "ndim") and hasattr(value, "tolist") else value


def _prompt_list(prompts: Any) -> list:
    """``generate``'s prompts as a list of single prompts (each checked later, by index).

    Any other iterable of prompts (a generator) is a batch too, as ``list()`` reads it; mappings and sets
    (no order to return results in), bytes (not text) and non-iterables are a TypeError naming what came.
    """
    prompts = _as_list(prompts)
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray, Mapping, Set)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be {_PROMPTS}; got {_describe(prompts)}")
    batch = [_as_list(p) for p in prompts]
    return [batch] if _is_token_ids(batch) else batch


def _to_params(p: Union[SamplingParams, dict, None], overrides: dict[str, Any]) -> SamplingParams:
    if p is None:
        return SamplingParams(**overrides)
    if isinstance(p, dict):
        return SamplingParams.from_dict({**p, **overrides})
    if isinstance(p, SamplingParams):
        return p.replace(**overrides) if overrides else p
    raise TypeError(f"sampling_params must be SamplingParams, a dict or a list of them, got {type(p).__name__}")


class InferenceEngine:
    """One model replica with its paged KV cache.

    ``InferenceEngine(model_path)`` loads a Hugging Face directory, or a Hub
    id (``"Qwen/Qwen2.5-0.5B-Instruct"``, at ``revision``) from the Hugging
    Face cache, downloading it unless ``HF_HUB_OFFLINE=1``; any
    ``EngineConfig`` field can be passed as a keyword (``dtype="bfloat16"``,
    ``block_size=32``, ``scheduling_policy="sjf-align"``,
    ``tensor_parallel_size=2``, ...). With tensor parallelism, ``shutdown()``
    (or ``with InferenceEngine(...) as engine:``) ends the worker processes;
    they also end when this process exits.
    """

    def __init__(self, model_path: Optional[str] = None, *, revision: Optional[str] = None,
                 config: Optional[EngineConfig] = None, **engine_options):
        if config is None:
            if model_path is None:
                raise ValueError("give model_path (a Hugging Face model directory or Hub id) or config")
            from .hub import resolve_model

            model_path = resolve_model(model_path, revision, option="model_path").path
            if engine_options.get("tokenizer") is not None:
                engine_options["tokenizer"] = resolve_model(engine_options["tokenizer"], what="tokenizer",
                                                            option="tokenizer").path
            config = EngineConfig.from_dict({"model": model_path, **engine_options})
        elif model_path is not None or engine_options or revision is not None:
            raise ValueError("give either config or model_path/engine options, not both")
        self.engine = LLMEngine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        # Every loop here (generate, each open stream_generate, the caller's own step()) steps the one engine,
        # and each step returns the outputs of every request. Outputs of requests a generate/stream call
        # waits for go to that request's mailbox; those of the caller's own add_request go to _unclaimed
        # until step() hands them out. (Dropping the others' outputs lost a stream's tokens, and its final
        # output, when a generate ran while the stream was open: the stream then spun forever.)
        self._mailboxes: dict[str, collections.deque] = {}
        self._unclaimed: list[RequestOutput] = []

    def shutdown(self) -> None:
        """Release the engine's worker processes (tensor parallel); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # The lower-level loop, for callers that schedule their own requests.
    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, **kw) -> None:
        self.engine.add_request(request_id, prompt, params, **kw)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of requests added with ``add_request`` (also those that
        another loop here, a ``generate`` or an open ``stream_generate``, stepped past)."""
        self._pump()
        out, self._unclaimed = self._unclaimed, []
        return out

    def _pump(self) -> None:
        for out in self.engine.step():
            box = self._mailboxes.get(out.request_id)
            (box.append if box is not None else self._unclaimed.append)(out)

    def _wait(self, request_ids: Sequence[str]) -> None:
        """Step once for outputs of ``request_ids``; a RuntimeError instead of spinning when the engine has
        nothing left to run for them (aborted from elsewhere)."""
        if not self.engine.has_unfinished_requests():
            raise RuntimeError(f"request(s) {', '.join(request_ids[:3])} are no longer in the engine (aborted "
                               "by another caller?) and will produce no more output")
        self._pump()

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def abort_request(self, request_id: str) -> bool:
        return self.engine.abort_request(request_id)

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: Union[SamplingParams, dict, Sequence[Union[SamplingParams, dict]], None] = None,
        *,
        use_tqdm: bool = False,
        **sampling_options,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in prompt order.

        ``prompts``: a string or a list of token ids (one prompt), or a list of
        either (a batch). A tuple is read as a list: a tuple of ints is one
        prompt, a tuple of prompts a batch; a 1-D numpy array or torch tensor
        of token ids is one prompt, a 2-D one a batch. Anything else is a
        TypeError.
        ``sampling_params``: one for all prompts or one per prompt; keyword
        options (``max_tokens=100``) override fields of it, e.g.
        ``structured_output={"json": schema}`` (or ``"regex"``, ``"choice"``,
        ``"json_object"``, ``"grammar"``). All prompts and parameters are
        checked before any work starts, grammars compiled included: a
        ValueError names the prompt index. A request too long for the model or the cache comes back
        with finish_reason "error" while the others complete.

        ``n`` (a sampling option: ``n=4`` or ``SamplingParams(n=4)``) gives n
        samples of a prompt, its prompt computed once: the list is flat,
        prompt-major then ``sample_index``, so with one n for all prompts the
        samples of prompt i are ``results[i * n:(i + 1) * n]``.
        """
        prompts = _prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
            per = list(sampling_params)
        else:
            per = [sampling_params] * len(prompts)
        checked = []
        for i, (prompt, p) in enumerate(zip(prompts, per)):
            try:
                params = _to_params(p, sampling_options)
                ids = self.engine.validate_prompt(prompt)
                self.engine.check_structured_output(params)
            except (ValueError, TypeError) as e:
                raise ValueError(f"prompt {i}: {e}") from None
            checked.append((ids, params))
        rid = f"gen-{next(_ids)}-"
        rids = [f"{rid}{i}" for i in range(len(checked))]
        results: dict[tuple[str, int], RequestOutput] = {}
        total = sum(params.n for _, params in checked)
        bar = None
        try:
            for request_id, (ids, params) in zip(rids, checked):
                self._mailboxes[request_id] = collections.deque()
                self.engine.add_request(request_id, ids, params)
            if use_tqdm:
                from tqdm import tqdm

                bar = tqdm(total=total, desc="generate", unit="req")
            while True:
                for request_id in rids:
                    box = self._mailboxes[request_id]
                    while box:
                        out = box.popleft()
                        if out.finished:
                            results[out.request_id, out.sample_index] = out
                            if bar is not None:
                                bar.update(1)
                if len(results) >= total:
                    break
                self._wait(rids)
        finally:
            if bar is not None:
                bar.close()
            for request_id in rids:
                if self._mailboxes.pop(request_id, None) is not None and len(results) < total:
                    self.engine.abort_request(request_id)  # interrupted (Ctrl-C): free its blocks
        return [results[f"{rid}{i}", j] for i, (_, params) in enumerate(checked) for j in range(params.n)]

    def stream_generate(
        self, prompt: Prompt, sampling_params: Union[SamplingParams, dict, None] = None, **sampling_options
    ) -> Iterator[tuple[int, str]]:
        """Yield (token id, text delta) as each token is generated.

        Deltas never split a multi-byte character; joined, they equal the
        final text. Runs the engine loop itself, so other queued requests
        advance too: several open streams, and ``generate`` calls made while
        one is open, each get all of their own outputs (not thread-safe: one
        thread drives an engine; the HTTP server serves concurrent clients). One sample only: ``n`` > 1 is refused (use ``generate``,
        or ``add_request(..., stream=True)`` and ``step``, whose outputs carry
        ``sample_index``).

        ``prompt``: one prompt, a string or a list (or tuple) of token ids. A
        bad prompt or parameter raises here, at the call, not at the first
        ``next``.
        """
        prompt = _as_list(prompt)
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"stream_generate takes one prompt, {_ONE_PROMPT}; got {_describe(prompt)}")
        if prompt and isinstance(prompt, (list, tuple)) and isinstance(prompt[0], (str, list, tuple)):
            raise TypeError(f"stream_generate takes one prompt, {_ONE_PROMPT}; got a batch of {len(prompt)} "
                            "prompts (use generate for a batch)")
        params = _to_params(sampling_params, sampling_options)
        if params.n != 1:
            raise ValueError(f"stream_generate streams one sample; got n={params.n} (use generate for n > 1)")
        ids = self.engine.validate_prompt(prompt)
        self.engine.check_structured_output(params)
        problem = self.engine.never_fits(len(ids), params)
        if problem is not None:
            raise ValueError(problem)
        return self._stream(ids, params)

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[tuple[int, str]]:
        rid = f"stream-{next(_ids)}"
        box = self._mailboxes[rid] = collections.deque()
        try:
            self.engine.add_request(rid, ids, params, stream=True)
            while True:
                while box:
                    out = box.popleft()
                    if out.finish_reason == "error":
                        raise ValueError(out.error)
                    for token in out.new_token_ids:
                        yield token, out.new_text
                    if out.finished:
                        return
                self._wait([rid])
        finally:
            del self._mailboxes[rid]
            self.engine.abort_request(rid)  # no-op when finished; frees blocks if the caller stopped early
