"""LLMEngine: requests in, outputs out, one step at a time.

``step()`` reads top to bottom: the scheduler plans, the model runner
executes, then each sequence that got a token is checked for its stopping
conditions. The job runner and the HTTP server drive this loop; the Python
API (``InferenceEngine``) wraps it.

With ``tensor_parallel_size`` N > 1 this process is rank 0: it starts N - 1
worker processes that each hold a shard of the model, and everything here
(scheduling, blocks, sampling, text) still runs once, in this process.
``shutdown()`` ends the workers (so does this process's exit).

A request with ``params.n`` > 1 is one prompt computed once and sampled n
times: its samples are sequences forked off the first when its prompt is
computed (see scheduler.py); each finishes on its own and gives its own
outputs, told apart by ``RequestOutput.sample_index``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Union

from ..config import EngineConfig, default_block_size
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, decode_output
from .model_runner import ModelRunner, resolve_device
from .models.config import ModelArgs
from .models.fp8 import check_fp8_support
from .models.quantization import resolve_quantization
from .models.sharding import check_tensor_parallel
from .outputs import RequestOutput, TokenLogprob
from .scheduler import Scheduler
from .sequence import PENDING, Sequence, SequenceStatus
from .structured import StructuredOutputs
from .tokenizer import eos_token_ids, load_tokenizer, prompt_token_ids

log = logging.getLogger(__name__)


def model_length_limit(args: ModelArgs) -> int:
    """The longest sequence (prompt + output) the model serves: its position limit, capped at its sliding
    window (our attention has none; within the window it is exact, so cap there rather than silently
    diverge)."""
    limit = args.max_position_embeddings
    return min(limit, args.sliding_window) if args.sliding_window else limit


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_args = ModelArgs.from_dir(config.model)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or config.model)
        if self.tokenizer is not None and len(self.tokenizer) > self.model_args.vocab_size:
            # Models pad their vocabulary past the tokenizer's (Qwen2.5: 152,064 for 151,665), never the
            # other way: a larger tokenizer is most likely another model's, and prompts it encodes to ids past
            # the embedding fail one by one.
            log.warning("the tokenizer of %s has %d tokens, more than the model's vocabulary of %d: prompts "
                        "with the extra ids are refused. Is it this model's tokenizer?",
                        config.tokenizer or config.model, len(self.tokenizer), self.model_args.vocab_size)
        self.eos_ids = eos_token_ids(config.model, self.tokenizer, self.model_args.eos_token_id)
        self.max_model_len = self._max_model_len()
        self.device = resolve_device(config)
        if config.block_size is None:  # before the runner and any tensor-parallel worker see the config
            config = self.config = dataclasses.replace(
                config, block_size=default_block_size(config.attention_backend, self.device.type))
        # Checked here, before any tensor-parallel worker starts: fp8 on a GPU without it, or a checkpoint
        # quantized in a way we cannot load (an fp8 checkpoint turns quantization "fp8" on).
        self.quantization = resolve_quantization(config.quantization, self.model_args,
                                                 os.path.join(config.model, "config.json"))
        if self.quantization == "fp8":
            check_fp8_support(self.device)
        self.tp = None
        if config.tensor_parallel_size > 1:
            from .tp_workers import start_tensor_parallel

            check_tensor_parallel(self.model_args, config.tensor_parallel_size)
            self.tp = start_tensor_parallel(config, self.device, self.max_model_len)
        try:
            self.runner = ModelRunner(config, self.model_args, self.device, self.max_model_len, self.eos_ids,
                                      tp=self.tp)
        except BaseException:
            self.shutdown()
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self._seqs: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples' sequences
        self._pending: list[RequestOutput] = []  # requests that ended before running (errors)
        self._inflight = None  # the launched step whose tokens are not yet read back
        self._num_penalty_seqs = 0
        self.structured = StructuredOutputs(self.tokenizer, self.model_args.vocab_size, self.eos_ids, self.device)
        self._num_constrained_seqs = 0
        self.num_finished = 0

    def _max_model_len(self) -> int:
        limit = model_length_limit(self.model_args)
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's limit of {limit} tokens")
        return self.config.max_model_len

    @property
    def cache_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    # -- requests ------------------------------------------------------

    def validate_prompt(self, prompt: Union[str, list[int]]) -> list[int]:
        """Token ids for a prompt; ValueError for empty prompts or ids outside the vocabulary."""
        return prompt_token_ids(self.tokenizer, self.model_args.vocab_size, prompt)

    def check_structured_output(self, params: SamplingParams) -> None:
        """Compile (once, cached) the request's structured-output grammar, if any.

        Raises ``StructuredOutputError`` (a ValueError naming the field) for a
        schema, regex or grammar that does not compile, or a tokenizer that
        cannot be mapped; callers check before ``add_request`` to report it
        against their own field.
        """
        self.structured.check(params)

    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: Optional[SamplingParams] = None,
                    *, stream: bool = False, arrival_time: Optional[float] = None) -> None:
        """Queue a request. Raises ValueError for a duplicate id, an empty/invalid prompt or
        a structured-output grammar that cannot compile (nothing is queued then).

        A request that can never fit (prompt + max_tokens beyond
        max_model_len or the whole KV cache, or more samples ``n`` than
        max_num_seqs) is not an exception: it comes back from the next
        ``step()`` with finish_reason "error", once per sample.
        """
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        ids = self.validate_prompt(prompt)
        grammar = self.structured.new_grammar(params) if params.structured_output is not None else None
        seq = Sequence(request_id, ids, params, arrival_time if arrival_time is not None else time.perf_counter())
        seq.grammar = grammar
        seq.stream = stream
        problem = self._never_fits(seq)
        if problem:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason, seq.error = "error", problem
            seq.timings.finished = time.perf_counter()
            for j in range(params.n):
                seq.sample_index = j
                self._pending.append(self._output(seq, [], ""))
            self.num_finished += params.n
            return
        self._start(seq)
        self._seqs[request_id] = [seq]
        self.scheduler.add(seq)

    def _start(self, seq: Sequence) -> None:
        """The engine's side of a new sequence (a request, or a sample forked off one)."""
        p = seq.params
        if (seq.stream or p.stop) and self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, p.skip_special_tokens,
                                                     p.stop)
        self._num_penalty_seqs += p.has_penalties
        self._num_constrained_seqs += seq.grammar is not None

    def _never_fits(self, seq: Sequence) -> Optional[str]:
        return self.never_fits(seq.num_prompt_tokens, seq.params)

    def never_fits(self, num_prompt_tokens: int, params: SamplingParams) -> Optional[str]:
        """Why a request of this prompt length and these params can never run here, or None."""
        if params.n > self.config.max_num_seqs:
            return (f"n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs}): the n samples of a "
                    f"request run together; ask for fewer samples or raise max_num_seqs")
        n, m = num_prompt_tokens, params.max_tokens
        if n + m > self.max_model_len:
            return (f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} exceeds the model's maximum length "
                    f"of {self.max_model_len} tokens")
        if n + m > self.cache_capacity_tokens:
            return (f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} exceeds the whole KV cache "
                    f"({self.cache_capacity_tokens} tokens); give the cache more memory")
        return None

    def abort_request(self, request_id: str) -> bool:
        """Abort every unfinished sample of a request and free their blocks; False if none is left."""
        seqs = self._seqs.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            self.scheduler.finish(seq)
            if PENDING in seq.token_ids:  # tokens still in flight are void
                del seq.token_ids[seq.token_ids.index(PENDING, seq.num_prompt_tokens):]
            if seq.params.has_penalties:
                self._num_penalty_seqs -= 1
            self._num_constrained_seqs -= seq.grammar is not None
            seq.finish_reason = "abort"
        return True

    def has_unfinished_requests(self) -> bool:
        inflight = self._inflight is not None and not all(s.is_finished for s in self._inflight.sample_seqs)
        return bool(self._pending) or inflight or self.scheduler.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return len(self._pending) + self.scheduler.num_unfinished()

    # -- the loop ------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return outputs of requests that finished (and, for streaming ones, progressed).

        Steps overlap: the step planned here is launched on the GPU before
        the tokens of the previous one are read back, so planning and input
        building hide behind the GPU's work. A sequence whose newest token is
        still being sampled is planned with a ``PENDING`` input that the GPU
        fills in; one that turns out to have stopped wastes one row of one step.
        A step with rows under a grammar (structured output) is launched in two
        halves: the forward pass first, then, once the previous step's tokens
        are read and the grammar bitmask is filled on the CPU, the sampler.
        """
        outputs, self._pending = self._pending, []
        prev, self._inflight = self._inflight, None
        if prev is not None and not self._can_overlap():
            outputs += self._collect(prev)
            prev = None
        plan = self.scheduler.schedule()
        if plan.is_empty():
            if prev is not None:
                return outputs + self._collect(prev)
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
            return outputs
        now = time.perf_counter()
        for seq in plan.seqs:
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
        for i, child in plan.forks:
            child.timings.first_scheduled = plan.seqs[i].timings.first_scheduled
            self._start(child)
            self._seqs[child.request_id].append(child)
        step = self.runner.launch_forward(plan, prev)
        self.scheduler.advance(plan)
        constrained = []  # sampling rows under a grammar
        track = self._num_constrained_seqs > 0
        for j, seq in enumerate(step.sample_seqs):
            seq.token_ids.append(PENDING)
            seq.pending_row = j
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finishing = True  # its pending token is its last: plan it no more
            if track and seq.grammar is not None:
                constrained.append(j)
        mask = None
        if constrained:
            # A row's mask depends on the token the step in flight is sampling: read that back
            # (the sync the overlap makes anyway), then fill the masks on the CPU while the
            # GPU runs this step's forward pass, and only then queue the sampler.
            if prev is not None:
                outputs += self._collect(prev)
                prev = None
            mask = self.structured.fill_bitmask(constrained, [step.sample_seqs[j] for j in constrained],
                                                len(step.sample_seqs))
        self.runner.launch_sampling(step, mask)
        if prev is not None:
            outputs += self._collect(prev)
        self._inflight = step
        return outputs

    def _can_overlap(self) -> bool:
        # Penalties count the output tokens on the device, so they need every token known.
        return self.config.async_scheduling and self._num_penalty_seqs == 0

    def _collect(self, step) -> list[RequestOutput]:
        """Read a launched step's tokens back and apply them: stops, text, finished requests."""
        result = self.runner.collect(step)
        now = time.perf_counter()
        outputs = []
        filled = []
        for j, (seq, token) in enumerate(zip(step.sample_seqs, result.token_ids)):
            if seq.is_finished:
                continue  # a request that ended (stopped or aborted) meanwhile
            # The pending slot of this step is the first PENDING one (a later step may have added another):
            # one of the last two, as at most one more step is in flight.
            pos = seq.token_ids.index(PENDING, max(seq.num_prompt_tokens, len(seq.token_ids) - 2))
            seq.token_ids[pos] = token
            filled.append((seq, pos, token, j))
        self.scheduler.cache_blocks(step.plan)
        for seq, pos, token, j in filled:
            self._apply_token(seq, pos, token, result.logprobs[j], result.top_logprobs[j], now)
            if seq.is_finished or seq.stream:
                outputs.append(self._emit(seq, pos))
        return outputs

    def _apply_token(self, seq: Sequence, pos: int, token: int, logprob, top, now: float) -> None:
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        if seq.logprobs is not None:
            seq.logprobs.append(TokenLogprob(token, logprob, top or []))
        p = seq.params
        reason = None
        seq.new_text = ""
        if seq.grammar is not None and not seq.grammar.accept(token):
            # Never while the mask is applied; kept from corrupting the output if it ever were not.
            reason, seq.error = "error", f"token {token} breaks the structured-output grammar (an engine bug)"
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids) or (
                seq.grammar is not None and seq.grammar.ended):
            # The token that ends the request is kept in token_ids but not in the text.
            reason, seq.stop_reason = "stop", token
        elif seq.detokenizer is not None:
            # Stop strings count from min_tokens on, as EOS and stop_token_ids do (vLLM's rule): a stop string
            # completed before then is text like any other.
            seq.new_text = seq.detokenizer.add_tokens([token], check_stops=pos + 1 - seq.num_prompt_tokens >= p.min_tokens)
            if seq.detokenizer.stop_hit is not None:
                reason, seq.stop_reason = "stop", seq.detokenizer.stop_hit
        if reason is None and (pos + 1 - seq.num_prompt_tokens >= p.max_tokens or pos + 1 >= self.max_model_len):
            reason = "length"
        if reason is not None:
            del seq.token_ids[pos + 1 :]  # a token planned after the stop is void
            seq.finish_reason = reason
            seq.timings.finished = now
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        samples = self._seqs[seq.request_id]
        samples.remove(seq)
        if not samples:
            del self._seqs[seq.request_id]
        self.num_finished += 1
        if seq.params.has_penalties:
            self._num_penalty_seqs -= 1
        self._num_constrained_seqs -= seq.grammar is not None

    def _emit(self, seq: Sequence, pos: int) -> RequestOutput:
        new_text = seq.new_text
        if seq.is_finished:
            if seq.detokenizer is not None:
                new_text += seq.detokenizer.finish()
                text = seq.detokenizer.text
            else:
                ids = seq.output_token_ids
                if seq.finish_reason == "stop" and isinstance(seq.stop_reason, int):
                    ids = ids[:-1]  # the token that ended it is not part of the text
                text = (decode_output(self.tokenizer, ids, seq.params.skip_special_tokens, seq.prompt_token_ids)
                        if self.tokenizer else "")
        else:
            text = seq.detokenizer.text if seq.detokenizer is not None else ""
        return self._output(seq, [seq.token_ids[pos]], new_text, text, upto=pos + 1)

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str, text: str = "",
                upto: Optional[int] = None) -> RequestOutput:
        # ``upto``: a streaming output covers the tokens known so far, not one still pending.
        out_ids = seq.token_ids[seq.num_prompt_tokens : upto]
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=out_ids,
            text=text, new_token_ids=new_ids, new_text=new_text, finished=seq.is_finished,
            finish_reason=seq.finish_reason, timings=seq.timings, error=seq.error, stop_reason=seq.stop_reason,
            logprobs=seq.logprobs, num_preemptions=seq.num_preemptions, sample_index=seq.sample_index)

    def shutdown(self) -> None:
        """End the tensor-parallel worker processes (waits for them). Idempotent; a no-op without workers."""
        if self.tp is not None:
            self.tp.close()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "free_blocks": bm.num_free_blocks,
            "used_blocks": bm.num_used_blocks,
            "peak_used_blocks": bm.peak_used_blocks,
            "prefix_caching": bm.enable_prefix_caching,
            "prefix_cache_hit_rate": bm.hit_rate,
            "prefix_cache_hit_tokens": bm.hit_tokens,
            "cow_block_copies": bm.num_cow_copies,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "finished": self.num_finished,
            **self.scheduler.stats.as_dict(),
            **self.structured.stats(),
        }
