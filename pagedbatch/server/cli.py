"""``serve``: the HTTP server's command (``python api_server.py`` and ``pagedbatch serve``).

Engine options carry the job runner's names; unset ones keep EngineConfig's
defaults, so the defaults live in one place.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

import click

from ..config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS, SCHEDULING_POLICIES
from .settings import DEFAULT_MAX_BODY_BYTES

# click parameter name -> EngineConfig field
_ENGINE_FIELDS = {
    "tokenizer": "tokenizer", "dtype": "dtype", "device": "device", "load_format": "load_format",
    "allow_pickle_weights": "allow_pickle_weights", "engine_seed": "seed", "block_size": "block_size",
    "kv_cache_memory_gb": "kv_cache_memory_gb", "gpu_memory_utilization": "gpu_memory_utilization",
    "num_kv_blocks": "num_kv_blocks", "enable_prefix_caching": "enable_prefix_caching",
    "kv_cache_dtype": "kv_cache_dtype",
    "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens", "scheduling_policy": "scheduling_policy",
    "sjf_max_skipped_steps": "sjf_max_skipped_steps", "attention_backend": "attention_backend",
    "enforce_eager": "enforce_eager", "prefill_graph_max_tokens": "prefill_graph_max_tokens",
    "tensor_parallel_size": "tensor_parallel_size",
    "tp_timeout_s": "tp_timeout_s", "tp_setup_timeout_s": "tp_setup_timeout_s",
    "quantization": "quantization",
}

_OPTIONS = [
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: all interfaces)."),
    click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port."),
    click.option("--model", "-m", default=None, help="Hugging Face model directory (Qwen v1 too), or a Hub id "
                 "(Qwen/Qwen2.5-7B-Instruct) resolved through the Hugging Face cache (HF_HOME, HF_HUB_CACHE; "
                 "HF_HUB_OFFLINE=1: the cache only). Without it: the built-in demo model (random weights)."),
    click.option("--revision", default=None, help="Hub revision of --model: a branch, tag or commit [main]."),
    click.option("--served-model-name", default=None, help="Name clients pass as \"model\" [the Hub id, or the "
                 "directory's name]."),
    click.option("--tokenizer", default=None, help="Tokenizer directory or Hub id [the model's]."),
    click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weights and compute dtype [auto]."),
    click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [auto]."),
    click.option("--load-format", type=click.Choice(LOAD_FORMATS), default=None, help="Weights format [auto]."),
    click.option("--allow-pickle-weights/--no-allow-pickle-weights", default=None,
                 help="Allow .bin (pickle) weights; they can run code."),
    click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
                 help="fp8: linear weights in float8 e4m3 (GPU: compute capability >= 8.9) [none; fp8 checkpoints "
                 "imply fp8]."),
    click.option("--engine-seed", type=int, default=None, help="Seed for dummy weights and unseeded sampling [0]."),
    click.option("--block-size", type=int, default=None,
                 help="KV-cache block size in tokens [64 on a GPU under the Triton attention backend, else 16]."),
    click.option("--kv-cache-memory-gb", type=float, default=None, help="CPU: KV-cache budget in GB [1.0]."),
    click.option("--gpu-memory-utilization", type=float, default=None, help="GPU: memory fraction to use [0.9]."),
    click.option("--num-kv-blocks", type=int, default=None, help="Exact number of KV blocks."),
    click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
                 help="Reuse KV blocks of shared prompt prefixes [on]."),
    click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default=None,
                 help="KV-cache storage: auto (the model's dtype) or fp8 (e4m3, per-layer scales) [auto]."),
    click.option("--max-model-len", type=int, default=None, help="Longest prompt+output in tokens [the model's]."),
    click.option("--max-num-seqs", type=int, default=None, help="Most sequences in one batch [256]."),
    click.option("--max-num-batched-tokens", type=int, default=None, help="Token budget per engine step [8192]."),
    click.option("--scheduling-policy", type=click.Choice(SCHEDULING_POLICIES), default=None, help="[fcfs]"),
    click.option("--sjf-max-skipped-steps", type=int, default=None, help="sjf-align starvation bound [8]."),
    click.option("--attention-backend", type=click.Choice(ATTENTION_BACKENDS), default=None, help="[auto]"),
    click.option("--enforce-eager/--no-enforce-eager", default=None, help="GPU: disable CUDA graphs."),
    click.option("--prefill-graph-max-tokens", type=int, default=None,
                 help="GPU: steps with prefill of up to this many tokens replay CUDA graphs too; 0: only decode "
                      "steps do [8192]."),
    click.option("--tensor-parallel-size", type=int, default=None,
                 help="Split the model over N GPUs (cuda:0..N-1) or N CPU processes [1]."),
    click.option("--tp-timeout-s", type=float, default=None,
                 help="Tensor parallel: seconds rank 0 waits on a worker in a step before failing [300]."),
    click.option("--tp-setup-timeout-s", type=float, default=None,
                 help="... and while loading, profiling and capturing graphs [1800]."),
    click.option("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, show_default=True,
                 help="Largest request body accepted (larger: 413)."),
    click.option("--max-tokens-cap", type=int, default=None,
                 help="Largest max_tokens a request may ask for [the model's maximum length]."),
    click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
                 default="info", show_default=True),
]


def _serve(host: str, port: int, model: Optional[str], revision: Optional[str], served_model_name: Optional[str],
           max_body_bytes: int, max_tokens_cap: Optional[int], log_level: str, **engine_values: Any) -> None:
    """Serve one model over HTTP: /generate, /generate_stream, /health and OpenAI's /v1 routes.

    All clients share one engine (continuous batching). See docs/server.md.
    """
    import logging

    import uvicorn

    from ..config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..hub import ModelNotFound, resolve_model
    from .app import create_app
    from .engine_loop import EngineLoop
    from .settings import ServerSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {_ENGINE_FIELDS[k]: v for k, v in engine_values.items() if v is not None}
    if model is None:
        if revision is not None:
            raise click.UsageError("--revision needs --model (a Hugging Face Hub id)")
        from ..demo import DEMO_NOTICE, demo_model_dir

        click.echo(f"[pagedbatch] {DEMO_NOTICE}", err=True)
        model = model_dir = demo_model_dir()
    else:
        try:
            model_dir = resolve_model(model, revision).path
            if values.get("tokenizer") is not None:
                values["tokenizer"] = resolve_model(values["tokenizer"], what="tokenizer").path
        except (ModelNotFound, ValueError) as e:
            raise click.ClickException(str(e)) from None
    try:
        config = EngineConfig.from_dict({"model": model_dir, **values})
        # A Hub id is its own name; a directory is named by its last component.
        name = model if model_dir != model else _default_name(model)
        settings = ServerSettings(model_name=served_model_name or name,
                                  aliases=tuple(dict.fromkeys((model, model_dir))),
                                  max_body_bytes=max_body_bytes, max_tokens_cap=max_tokens_cap)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"[pagedbatch] loading {model}" + (f" ({model_dir})" if model_dir != model else "") + " ...", err=True)
    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    app = create_app(EngineLoop(engine, max_tokens_cap), settings)
    click.echo(f"[pagedbatch] serving {settings.model_name!r} on http://{host}:{port} "
               f"(max_model_len {engine.max_model_len}, {engine.block_manager.num_blocks} KV blocks)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _default_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir)) or model_dir


def _build() -> click.Command:
    fn = _serve
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return click.command("serve", context_settings={"help_option_names": ["-h", "--help"],
                                                    "max_content_width": 110})(fn)


serve = _build()

if __name__ == "__main__":
    serve(prog_name=os.path.basename(sys.argv[0]))
