"""Turns a step plan into tensors, runs the model, samples.

The runner owns everything on the device: weights, the KV cache, the rotary
table, the attention backend and the sampler. It makes no policy: it
executes exactly the ``SchedulerOutput`` it is given. One host sync per
step (reading the sampled token ids back) is the only one it makes.

Tensor parallel (``tp`` given): every rank has a runner over its shard of
the model and its own KV heads. Rank 0's runner is the engine's: it builds
the step inputs, broadcasts them, runs its shard and samples from the
logits gathered to it. The other ranks' runners live in worker processes
and loop in ``serve``: receive a step, run the shard, send the logits.
Setup (profiling, graph capture) runs the same collectives on every rank
in the same order.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import EngineConfig
from .attention.kv_quant import check_kv_cache_device, key_contiguous_v, kv_cache_torch_dtype, layer_caches
from .attention.metadata import AttentionMetadata
from .models.config import ModelArgs, rope_cos_sin
from .models.loader import load_model
from .models.sharding import TPShard
from .sampler import Sampler, SamplingBatch, SamplingBatchCache
from .scheduler import SchedulerOutput
from .step_inputs import StepInputBuilder, unpack

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank ``rank``: with several ranks on GPUs, rank r uses cuda:r."""
    if config.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    tp = config.tensor_parallel_size
    if dev.type == "cuda" and tp > 1:
        if dev.index not in (None, 0):
            raise ValueError(f"with tensor_parallel_size {tp} the ranks use cuda:0..cuda:{tp - 1}; device "
                             f"{config.device!r} cannot be honoured (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs; {torch.cuda.device_count()} visible")
        dev = torch.device("cuda", rank)
    return dev


def resolve_dtype(config: EngineConfig, args: ModelArgs, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return auto_dtype(args.torch_dtype, device.type)


def auto_dtype(model_dtype: Optional[str], device_type: str) -> torch.dtype:
    """What dtype "auto" means for a model whose config names ``model_dtype`` (None: none) on a device type."""
    if device_type == "cpu":
        return torch.float32  # CPU bf16 matmuls are slow and inexact; float32 is the CPU default
    return _DTYPES.get(str(model_dtype).replace("torch.", ""), torch.bfloat16)


def make_backend(config: EngineConfig, device: torch.device):
    from .attention.torch_ref import TorchAttentionBackend

    name = config.attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name.startswith("triton"):
        try:
            if name == "triton":
                from .attention.triton_backend import TritonAttentionBackend
            else:  # the first, simpler kernels (no split-K, separate rotary), kept for comparison
                from .attention.triton_paged import TritonAttentionBackend
        except ImportError as e:
            if config.attention_backend != "auto":
                raise ValueError(f"attention_backend {name!r} is not available: {e}") from e
            return TorchAttentionBackend()
        if name == "triton":
            return TritonAttentionBackend(decode_config=config.decode_attention_config,
                                          prefill_tile=config.prefill_attention_config)
        return TritonAttentionBackend()
    return TorchAttentionBackend()


@dataclass
class StepResult:
    """Per sampling row of the step (``InFlightStep.sample_seqs``): the token, its logprob and alternatives."""

    token_ids: list[int]
    logprobs: list[Optional[float]]
    top_logprobs: list[Optional[list[tuple[int, float]]]]


class InFlightStep:
    """A launched step: its plan, the sequence each sampling row is for, and (once launched) the sampler's results.

    ``sample_seqs`` are the plan's sequences whose last token the step
    computes, then the samples the plan forks (``SchedulerOutput.forks``).
    """

    def __init__(self, plan: SchedulerOutput, sample_seqs: list):
        self.plan = plan
        self.sample_seqs = sample_seqs
        self.logits: Optional[torch.Tensor] = None  # between launch_forward and launch_sampling
        self.batch: Optional[SamplingBatch] = None
        self.token_ids: Optional[torch.Tensor] = None  # on the device: the next step's inputs read it
        self.host: list = []  # token ids, logprobs, top ids, top logprobs, copied without a sync
        self.done = None  # CUDA event after the copies


class ModelRunner:
    """``tp``: this rank's ``TPGroup`` when the model is split over several processes."""

    def __init__(self, config: EngineConfig, args: ModelArgs, device: torch.device, max_model_len: int,
                 eos_ids: set[int], tp=None):
        self.config = config
        self.args = args
        self.device = device
        self.tp = tp
        self.dtype = resolve_dtype(config, args, device)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        check_kv_cache_device(self.kv_dtype, device)  # before any weight is read
        self.max_model_len = max_model_len
        self.eos_ids = sorted(eos_ids)
        shard = TPShard(tp.rank, tp.size) if tp is not None else TPShard()
        self.model = load_model(config.model, args, self.dtype, device, load_format=config.load_format,
                                allow_pickle=config.allow_pickle_weights, seed=config.seed, shard=shard, comm=tp,
                                quantization=config.quantization)
        if tp is not None:
            # Every rank has loaded before any rank profiles (NCCL) a model it could not wait for.
            self.bytes_read_per_rank = tp.all_ints(self.model.checkpoint_bytes_read)
        local = self.model.local_args  # this rank's heads (and KV heads): the KV cache holds only those
        if config.kv_cache_dtype != "auto" and len(self.model.kv_scales_loaded) < args.num_layers:
            log.warning("kv_cache_dtype %r: %d of %d layers have no k_scale/v_scale in the checkpoint; they use "
                        "1.0 (values beyond +-448 saturate)", config.kv_cache_dtype,
                        args.num_layers - len(self.model.kv_scales_loaded), args.num_layers)
        self.backend = make_backend(config, device)
        self.cos_sin = rope_cos_sin(args, max_model_len, device)
        self.sampler = Sampler(seed=config.seed, fused=None if config.fused_sampler else False)
        self.sampling_batches = SamplingBatchCache()
        self.block_size = config.block_size
        with self._span("measuring memory for the KV cache"):
            self.num_blocks = self._decide_num_blocks()
        if tp is not None:
            self.num_blocks = tp.min_int(self.num_blocks)  # the block manager's ids must exist on every rank
        # One extra block past those the block manager hands out: the scratch
        # block that CUDA-graph padding rows write into.
        shape = (2, args.num_layers, self.num_blocks + 1, self.block_size, local.num_kv_heads, args.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.kv_caches = layer_caches(self.kv_cache, key_contiguous_v(self.kv_dtype, self.backend.name))
        self.graphs = self.prefill_graphs = None
        if self._graphs_on():
            from .cuda_graphs import DecodeGraphs, PrefillGraphs

            common = dict(
                max_blocks_per_seq=-(-max_model_len // self.block_size), max_model_len=max_model_len,
                scratch_block=self.num_blocks, block_size=self.block_size, hidden_size=args.hidden_size,
                dtype=self.dtype, device=device,
                # Not the bound self._synchronize: graphs -> runner would be a reference cycle, and a
                # dropped engine's KV cache would stay allocated on the GPU until the next gc pass.
                synchronize=tp.synchronize if tp is not None else functools.partial(torch.cuda.synchronize, device),
                # With TP the graphs hold the NCCL all-reduces too; every rank captures the same buckets in
                # order. NCCL's watchdog thread queries CUDA events meanwhile, which a "global" capture forbids.
                capture_error_mode="thread_local" if tp is not None else "global")
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.cos_sin, self.backend,
                                       max_batch=config.max_num_seqs, **common)
            with self._span("capturing CUDA graphs"):
                self.graphs.capture()
            if self._prefill_graph_tokens():
                self.prefill_graphs = PrefillGraphs(self.model, self.kv_caches, self.cos_sin, self.backend,
                                                    max_tokens=self._prefill_graph_tokens(),
                                                    max_seqs=config.max_num_seqs, **common)
                with self._span("capturing CUDA graphs for prefill steps"):
                    self.prefill_graphs.capture(pool=self.graphs.pool)
        self._warm_up_lm_head()
        self.inputs = StepInputBuilder(device, self.block_size, max_blocks_per_seq=-(-max_model_len // self.block_size))
        self.prepare_s = 0.0  # host time spent building step inputs (reported by benchmarks)
        self.steps = 0

    @torch.inference_mode()
    def _warm_up_lm_head(self) -> None:
        # The decode graphs' capture compiled the forward's kernels for every bucket; the LM head runs outside
        # them, at each step's exact row count, so a skinny-GEMM variant first needed as the batch shrinks
        # would compile mid-job (~0.25 s each). An H200 W-nano run with fp8 weights, whose forward shares no
        # variant with the bf16 head, compiled 3 in its last 62 steps: 0.8 s of a 6.5 s run (2026-12-04).
        # Local to this rank (no gather), so workers may run it unsynchronized.
        from .models.linear import skinny_variant_rows

        for m in skinny_variant_rows(self.model.lm_head, self.device):
            self.model.compute_logits(torch.zeros(m, self.args.hidden_size, dtype=self.dtype, device=self.device))

    def _graphs_on(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name.startswith("triton")

    def _prefill_graph_tokens(self) -> int:
        """The largest step with prefill that replays a graph (0: none): the config's, within a step's size."""
        if not self._graphs_on():
            return 0
        c = self.config
        return min(c.prefill_graph_max_tokens, c.max_num_batched_tokens)

    # -- KV cache size -------------------------------------------------

    def bytes_per_block(self) -> int:
        """KV bytes of one block on this rank (its own KV heads)."""
        a = self.args
        kv_heads = self.model.local_args.num_kv_heads
        return 2 * a.num_layers * self.block_size * kv_heads * a.head_dim * self.kv_dtype.itemsize

    def _decide_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cpu":
            return max(1, int(self.config.kv_cache_memory_gb * 2**30) // self.bytes_per_block())
        return self._profile_gpu_blocks()

    def _span(self, what: str):
        # Setup that runs collectives: with workers, rank 0 must not block in it for good.
        return self.tp.span(what) if self.tp is not None else contextlib.nullcontext()

    def _synchronize(self) -> None:
        # With workers, a plain device sync would hang forever on a dead worker's collective.
        if self.tp is not None:
            self.tp.synchronize()
        else:
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _profile_gpu_blocks(self) -> int:
        # Run the largest step the scheduler may plan, with a throwaway cache,
        # and give the KV cache what is left of the memory budget.
        self._synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        a = self.args
        blocks = -(-n // self.block_size)
        kv_heads = self.model.local_args.num_kv_heads
        tmp = torch.zeros((2, a.num_layers, blocks, self.block_size, kv_heads, a.head_dim),
                          dtype=self.kv_dtype, device=self.device)
        caches = layer_caches(tmp, key_contiguous_v(self.kv_dtype, self.backend.name))
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.arange(n, device=dev), slot_mapping=torch.arange(n, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
            num_seqs=1, num_tokens=n, max_query_len=n, max_seq_len=n)
        hidden = self.model(torch.zeros(n, dtype=torch.long, device=dev), caches, self.cos_sin, meta, self.backend)
        rows = min(self.config.max_num_seqs, n)
        logits = self._logits(hidden[:rows])
        if logits is not None:  # rank 0 holds the gathered logits and samples from them
            logits.float().softmax(-1)
        self._synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - tmp.numel() * tmp.element_size()
        del tmp, caches, hidden, logits
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        # The prefill graphs keep their activations in a pool of their own: about their largest step's share
        # of this n-token step's (activations grow with tokens).
        graph_pool = max(0, peak - base) * min(1.0, self._prefill_graph_tokens() / n)
        budget = total * self.config.gpu_memory_utilization - peak - graph_pool
        num = int(budget // self.bytes_per_block()) - 1  # minus the scratch block
        if num < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: the model and activations need {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens")
        log.info("KV cache: %d blocks of %d tokens (%.1f GiB, %s); model+activations peak %.1f GiB",
                 num, self.block_size, num * self.bytes_per_block() / 2**30, self.kv_dtype, peak / 2**30)
        return num

    # -- one step --------------------------------------------------------

    @property
    def prepare_ms_mean(self) -> float:
        return 1e3 * self.prepare_s / max(1, self.steps)

    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run one step and wait for its tokens (the synchronous form of launch + collect)."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, prev: Optional["InFlightStep"] = None) -> "InFlightStep":
        """Queue one step's GPU work and return without waiting for it.

        Decode rows whose input token is still being sampled by ``prev`` (the
        step in flight) take it from ``prev``'s device tensor, so the host
        can plan and launch step N+1 while the GPU runs step N.
        """
        return self.launch_sampling(self.launch_forward(plan, prev))

    @torch.inference_mode()
    def launch_forward(self, plan: SchedulerOutput, prev: Optional["InFlightStep"] = None) -> "InFlightStep":
        """The first half of ``launch``: queue the forward pass and logits, and build the sampling settings.

        ``launch_sampling`` queues the rest. In between, the host may read
        ``prev``'s tokens and fill a grammar bitmask while the GPU runs this
        step's forward pass.
        """
        if self.tp is None:
            return self._launch_forward(plan, prev)
        self.tp.check_workers()
        # The workers run the same collectives from the step broadcast to the logits gather, and
        # any launch here, the inputs' copy included, can block behind a collective that never completes.
        with self.tp.in_step():
            return self._launch_forward(plan, prev)

    def _launch_forward(self, plan: SchedulerOutput, prev: Optional["InFlightStep"]) -> "InFlightStep":
        t0 = time.perf_counter()
        inputs = self.inputs.build(plan, prev.token_ids if prev is not None else None,
                                   int32=not self._decode_graph_step(len(plan.seqs), plan.num_tokens))
        seqs = inputs.sample_seqs
        self.prepare_s += time.perf_counter() - t0
        self.steps += 1
        if self.tp is not None:
            self.tp.send_step(inputs.header, inputs.packed)
        logits = self._run_step(inputs)
        step = InFlightStep(plan, seqs)
        if not seqs:
            return step
        step.logits = logits
        step.batch = self.sampling_batches.get(seqs, self._suppressed, logits.shape[-1], self.device)
        return step

    @torch.inference_mode()
    def launch_sampling(self, step: "InFlightStep", grammar_mask=None) -> "InFlightStep":
        """The second half of ``launch``: queue the sampler (under ``grammar_mask``, a
        ``structured.GrammarMask``, if given) and the copy of its results to the host."""
        if not step.sample_seqs:
            return step
        if self.tp is None:
            return self._launch_sampling(step, grammar_mask)
        with self.tp.span("the sampler"):  # its launches can queue behind a collective that never completes
            return self._launch_sampling(step, grammar_mask)

    def _launch_sampling(self, step: "InFlightStep", grammar_mask) -> "InFlightStep":
        batch, logits = step.batch, step.logits
        step.batch = step.logits = None
        batch.grammar_mask = grammar_mask
        out = self.sampler(logits, batch)
        step.token_ids = out.token_ids
        # Copy the results to the host without waiting; collect() waits on the event alone,
        # not on whatever step has been queued after this one.
        cuda = self.device.type == "cuda"
        step.host = [t.to("cpu", non_blocking=cuda) if t is not None else None
                     for t in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)]
        if cuda:
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: "InFlightStep") -> StepResult:
        """Wait for a launched step's sampled tokens (the one host sync of a step)."""
        seqs = step.sample_seqs
        n = len(seqs)
        result = StepResult([], [None] * n, [None] * n)
        if not seqs:
            return result
        if step.done is not None:
            if self.tp is not None:
                self.tp.wait_event(step.done)
            else:
                step.done.synchronize()
        tok_t, lp_t, top_ids_t, top_lp_t = step.host
        result.token_ids = tok_t.tolist()
        if lp_t is None:
            return result
        lps = lp_t.tolist()
        tops = (top_ids_t.tolist(), top_lp_t.tolist()) if top_ids_t is not None else None
        for j, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is not None:
                result.logprobs[j] = lps[j]
                result.top_logprobs[j] = list(zip(tops[0][j][:k], tops[1][j][:k])) if tops and k else []
        return result

    def _run_step(self, inputs) -> Optional[torch.Tensor]:
        """The step's forward pass and, if any row samples, its logits (None on workers, or with nothing to sample)."""
        if inputs.copy_src.numel():
            self._copy_blocks(inputs.copy_src, inputs.copy_dst)
        hidden = self._forward(inputs)
        if not inputs.logits_index.numel():
            return None
        return self._logits(hidden if inputs.logits_all_rows else hidden.index_select(0, inputs.logits_index))

    def _copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        # Copy-on-write of blocks shared by forked samples: K and V of every layer, in one gather and one
        # scatter (the gather completes first, so a block freed and reused as a destination in the same
        # step is still read as it was).
        self.kv_cache.index_copy_(2, dst, self.kv_cache.index_select(2, src))

    def _decode_graph_step(self, num_seqs: int, num_tokens: int) -> bool:
        """Whether a step runs a decode graph; its inputs then stay int64 (``unpack(int32=False)``)."""
        return self.graphs is not None and num_tokens == num_seqs <= self.graphs.max_batch

    def _forward(self, inputs) -> torch.Tensor:
        ids, meta = inputs.input_ids, inputs.meta
        # Every rank takes the same branch: it depends only on the broadcast header.
        if self._decode_graph_step(meta.num_seqs, meta.num_tokens):
            return self.graphs.run(inputs.ids_positions_slots(), meta)
        if self.prefill_graphs is not None and self.prefill_graphs.fits(meta):
            return self.prefill_graphs.run(ids, meta)
        return self.model(ids, self.kv_caches, self.cos_sin, meta, self.backend)

    def _logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Full-vocabulary logits on rank 0 (gathered from every rank's slice); None on the other ranks."""
        logits = self.model.compute_logits(hidden)
        if self.tp is None:
            return logits
        return self.tp.gather_logits(logits, self.args.vocab_size)

    @torch.inference_mode()
    def serve(self) -> None:
        """A worker rank's loop: run each step rank 0 broadcasts, for as long as the process lives."""
        while True:
            header, packed = self.tp.recv_step()
            self._run_step(unpack(packed, header, int32=not self._decode_graph_step(header[0], header[1])))

    def _suppressed(self, seq) -> list[int]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return (self.eos_ids if not p.ignore_eos else []) + p.stop_token_ids
