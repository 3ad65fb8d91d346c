"""The one engine configuration, built once and passed down.

Every knob the engine has lives here; nothing deeper reads environment
variables or globals. Validation happens at construction so a bad value
fails before any model is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

SCHEDULING_POLICIES = ("fcfs", "sjf-align")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "triton-basic")
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model's dtype; fp8: float8 e4m3 with per-layer scales


@dataclass
class EngineConfig:
    """Engine settings. ``model`` is a Hugging Face model directory (Hub ids are
    resolved to one before: ``pagedbatch.hub.resolve_model``)."""

    model: str
    tokenizer: Optional[str] = None  # defaults to ``model``
    dtype: str = "auto"
    device: str = "auto"  # "auto" = cuda if available else cpu
    load_format: str = "auto"
    allow_pickle_weights: bool = False  # .bin weights run pickle code: opt-in only
    # "fp8": the decoder layers' linear weights in float8 e4m3 (per-output-channel scales, quantized at load
    # from bf16/fp16 checkpoints; fp8 checkpoints imply it), activations quantized per token. docs/jobs.md.
    quantization: Optional[str] = None
    seed: int = 0  # seeds random weights (dummy) and unseeded sampling
    # Benchmarks on config-only model directories: prompts must be token ids
    # and outputs carry no text.
    skip_tokenizer_init: bool = False

    # KV cache
    # Tokens per KV-cache block (a power of two, 16-256). None: default_block_size() -- 64 under the Triton attention
    # backend on a GPU, 16 elsewhere.
    block_size: Optional[int] = None
    kv_cache_memory_gb: float = 1.0  # CPU budget
    gpu_memory_utilization: float = 0.90  # GPU: fraction of total memory the engine may use
    num_kv_blocks: Optional[int] = None  # exact override (tests, benchmarks)
    # Reuse the K/V of full blocks shared with earlier prompts (exact; see block_manager.py).
    enable_prefix_caching: bool = True
    # "fp8": the cache stores float8 e4m3 with a K and a V scale per layer (from the checkpoint, else 1.0):
    # twice the tokens fit. Needs compute capability >= 8.9 on a GPU; any CPU.
    kv_cache_dtype: str = "auto"

    # Scheduler
    max_model_len: Optional[int] = None  # defaults to the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduling_policy: str = "fcfs"
    # sjf-align: a running sequence that has been passed over this many steps
    # in a row is scheduled regardless of its length (the starvation bound).
    sjf_max_skipped_steps: int = 8

    attention_backend: str = "auto"
    # The Triton backend's paged-decode kernel configuration, a name in
    # engine/attention/triton_decode.DECODE_CONFIGS (None: its default for the cache dtype). For tuning and
    # A/B benchmarks (bench/throughput.py --decode-config); an unknown name fails at engine start.
    decode_attention_config: Optional[str] = None
    # The Triton backend's prefill tile, 'bm<rows> bn<keys> w<warps> st<stages>' (triton_kernels.PrefillTile;
    # None: its default). For tuning and A/B benchmarks (bench/throughput.py --prefill-config).
    prefill_attention_config: Optional[str] = None
    enforce_eager: bool = False  # GPU: disable CUDA graphs
    # GPU: steps with prefill of up to this many tokens also replay CUDA graphs (0: only decode steps do);
    # the graphs' activations take about this share of the largest step's from the KV cache's budget.
    # 8192 since 2026-12-06 (was 512): run eagerly, W-nano's 8,192-token steps with fp8 weights take ~14 ms
    # of host launches against ~18 ms of GPU work, and on a slower host they became host-bound: in one
    # process on an H100 their GPU kernels took 362 ms in every run while their wall time went 0.46-0.89 s;
    # replayed as graphs, 0.310-0.312 s in all six runs, and bench/throughput.py W-nano fp8 weights + fp8 KV
    # 28,268 / 28,269 tok/s against 26,035 / 26,778 eager (alternated); on the next H100, W-nano bf16
    # 20,110-20,507 against 19,129 and W1 bf16 16,738 against 16,597 (docs/benchmarks.md, twenty-fifth
    # session). On hosts fast enough to keep up the two were within 1% (H200 and H100, twenty-third session).
    prefill_graph_max_tokens: int = 8192
    # Split the model over this many processes (GPUs cuda:0..N-1, or CPU ranks
    # over gloo); must divide the attention heads. See docs/parallel.md.
    tensor_parallel_size: int = 1
    # Tensor parallel: how long rank 0 waits on a worker before failing with a WorkerStuckError naming it.
    # Steps take milliseconds to seconds; setup (a 70B shard's load, Triton compiles, graph capture) minutes.
    tp_timeout_s: float = 300.0
    tp_setup_timeout_s: float = 1800.0
    # Plan and launch step N+1 while the GPU runs step N (off only to debug).
    async_scheduling: bool = True
    # GPU: batches using only temperature and greedy rows sample in one Triton pass over the
    # logits (engine/sampling_kernels.py); off: the torch ops (A/B benchmarks, debugging).
    fused_sampler: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a path to a Hugging Face model directory")
        _choice("dtype", self.dtype, DTYPES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None (weights as the checkpoint stores them) or one of "
                             f"{', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.decode_attention_config is not None and self.attention_backend in ("torch", "triton-basic"):
            raise ValueError(f"decode_attention_config is a setting of the 'triton' attention backend, not of "
                             f"{self.attention_backend!r}")
        if self.prefill_attention_config is not None:
            if self.attention_backend in ("torch", "triton-basic"):
                raise ValueError(f"prefill_attention_config is a setting of the 'triton' attention backend, not "
                                 f"of {self.attention_backend!r}")
            _check_prefill_tile(self.prefill_attention_config)
        if self.kv_cache_dtype != "auto" and self.attention_backend == "triton-basic":
            raise ValueError("attention_backend 'triton-basic' has no fp8 KV cache: use 'triton', 'torch' or 'auto'")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or not 16 <= self.block_size <= 256
                                            or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two between 16 and 256, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not (0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        for name in ("tp_timeout_s", "tp_setup_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.prefill_graph_max_tokens, bool) or not isinstance(self.prefill_graph_max_tokens, int) \
                or self.prefill_graph_max_tokens < 0:
            raise ValueError(f"prefill_graph_max_tokens must be an integer >= 0, got {self.prefill_graph_max_tokens!r}")
        if self.sjf_max_skipped_steps < 0:
            raise ValueError(f"sjf_max_skipped_steps must be >= 0, got {self.sjf_max_skipped_steps}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_block_size(attention_backend: str, device_type: str) -> int:
    """The KV block size an EngineConfig without one gets on a resolved device.

    64 under the Triton attention backend on a GPU: a block per 64-key tile of its decode kernels, whose tile then
    reads one block id instead of one per key (sm_90: 225 instructions a tile instead of 268 with an fp8 cache, 252
    instead of 356 with bf16). Measured on an H100, 2026-12-05 (docs/benchmarks.md, nineteenth session): W-nano
    with an fp8 cache 9% faster end to end, with fp8 weights + fp8 KV 9%, bf16 W-nano 1%, prefill 1.5%, W1 and single
    stream level. 16 elsewhere (the torch reference backend, the first Triton kernels): there the size only sets
    how finely prompts share cached prefixes (whole blocks are shared)."""
    if device_type == "cuda" and attention_backend in ("auto", "triton"):
        return 64
    return 16


def _check_prefill_tile(text: Any) -> None:
    from .engine.attention.prefill_tile import PrefillTile

    try:
        PrefillTile.parse(text)
    except ValueError as e:
        raise ValueError(f"prefill_attention_config: {e}") from None


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
