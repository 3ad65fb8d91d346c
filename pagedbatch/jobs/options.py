"""JobOptions: everything one batch job needs, merged from a YAML job file and the command line.

Built once at the top (``JobOptions.from_sources``), validated at
construction, then passed down; the Slurm environment is read here and
nowhere deeper. Engine fields mirror ``EngineConfig`` and sampling fields
mirror ``SamplingParams``: ``None`` means "that class's default", so the
defaults live in one place.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from ..config import EngineConfig
from ..sampling_params import SamplingParams

OUTPUT_FORMATS = ("parquet", "jsonl")
EXECUTORS = ("local", "ray")

# Job option name -> EngineConfig field. The engine's ``seed`` (random
# weights, unseeded sampling) is ``engine_seed`` here: ``seed`` is the
# per-request sampling seed, as in the input rows.
ENGINE_FIELDS = {
    "model": "model", "tokenizer": "tokenizer", "dtype": "dtype", "device": "device",
    "load_format": "load_format", "allow_pickle_weights": "allow_pickle_weights", "engine_seed": "seed",
    "block_size": "block_size", "kv_cache_memory_gb": "kv_cache_memory_gb",
    "gpu_memory_utilization": "gpu_memory_utilization", "num_kv_blocks": "num_kv_blocks",
    "enable_prefix_caching": "enable_prefix_caching", "kv_cache_dtype": "kv_cache_dtype",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
    "scheduling_policy": "scheduling_policy", "sjf_max_skipped_steps": "sjf_max_skipped_steps",
    "attention_backend": "attention_backend", "enforce_eager": "enforce_eager",
    "prefill_graph_max_tokens": "prefill_graph_max_tokens",
    "tensor_parallel_size": "tensor_parallel_size",
    "tp_timeout_s": "tp_timeout_s", "tp_setup_timeout_s": "tp_setup_timeout_s", "quantization": "quantization",
}
SAMPLING_FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs",
    "skip_special_tokens", "n",
)


@dataclass
class JobOptions:
    """One batch job's settings. See docs/jobs.md for each option."""

    # Input / output
    input: str
    output: Optional[str] = None  # default: out/<input file stem>
    input_format: Optional[str] = None  # None: follow the file
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    prompt_token_ids_field: str = "prompt_token_ids"
    id_field: str = "id"
    # A Jinja2 template over the record's fields that makes the prompt (text, or
    # a file holding it); with system_prompt the prompt becomes chat messages.
    prompt_template: Optional[str] = None
    prompt_template_file: Optional[str] = None
    system_prompt: Optional[str] = None
    # Input columns copied into the result rows with their Arrow types: names, or "all".
    keep_columns: Union[list[str], str, None] = None
    output_format: str = "parquet"
    include_prompt: bool = False
    include_token_ids: bool = False
    include_logprobs: bool = False
    overwrite: bool = False

    # Model and engine (None: EngineConfig's default; model None: the demo model).
    # model / tokenizer: a local directory or a Hugging Face Hub id (pagedbatch.hub).
    model: Optional[str] = None
    revision: Optional[str] = None  # the Hub revision of model (branch, tag or commit)
    tokenizer: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    load_format: Optional[str] = None
    allow_pickle_weights: Optional[bool] = None
    quantization: Optional[str] = None
    engine_seed: Optional[int] = None
    block_size: Optional[int] = None
    kv_cache_memory_gb: Optional[float] = None
    gpu_memory_utilization: Optional[float] = None
    num_kv_blocks: Optional[int] = None
    enable_prefix_caching: Optional[bool] = None
    kv_cache_dtype: Optional[str] = None
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    scheduling_policy: Optional[str] = None
    sjf_max_skipped_steps: Optional[int] = None
    attention_backend: Optional[str] = None
    enforce_eager: Optional[bool] = None
    prefill_graph_max_tokens: Optional[int] = None
    tensor_parallel_size: Optional[int] = None
    tp_timeout_s: Optional[float] = None
    tp_setup_timeout_s: Optional[float] = None

    # Default sampling (None: SamplingParams' default); rows may override
    max_tokens: Optional[int] = None
    min_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[list[str], str, None] = None  # one stop string, or a list
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    logprobs: Optional[int] = None
    skip_special_tokens: Optional[bool] = None
    n: Optional[int] = None  # samples per record: n result rows, sample_index 0..n-1
    # Structured output for every row (at most one; a row's own response_format wins):
    json_schema: Union[str, dict, None] = None  # a JSON schema file, or (job files, Python) the schema itself
    regex: Optional[str] = None
    choice: Union[list[str], str, None] = None  # "a,b,c" on the command line

    # Job control
    max_rows: Optional[int] = None
    shard_index: Optional[int] = None  # None: from Slurm, else 0
    num_shards: Optional[int] = None  # None: from Slurm, else 1
    max_error_rate: Optional[float] = None  # None: never abort for errors (a fraction of records)
    error_rate_min_rows: int = 20  # records
    commit_every: int = 1000  # rows
    commit_interval_s: float = 60.0
    max_in_flight: Optional[int] = None  # samples (a record of n counts n); None: 2 * max_num_seqs
    order: str = "input"  # admission order within a window: input | length | prefix
    order_window: int = 4096  # rows held for re-ordering (bounds memory)
    read_batch_rows: int = 1024
    quiet: bool = False
    log_interval_s: float = 10.0

    # Parallelism
    # Engine worker processes, one per GPU (or tensor-parallel group); "auto":
    # every visible GPU, or 1 without a GPU. 1 runs the engine in this process.
    data_parallel_size: Union[int, str] = 1
    # local: this machine (in this process, or N worker processes); ray: Ray Data on a
    # Ray cluster (ray_address; None: start a local one), one engine actor per GPU.
    executor: str = "local"
    ray_address: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.input, str) or not self.input:
            raise ValueError("input is required: a JSONL/Parquet/CSV file, a datasets directory or an OpenAI batch file")
        _check_types(self)
        if self.output is None:
            stem = os.path.basename(os.path.normpath(self.input)).split(".")[0] or "job"
            self.output = os.path.join("out", stem)
        self._check_model_options()
        self._check_prompt_options()
        self.keep_columns = parse_keep_columns(self.keep_columns)
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {self.output_format!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        from .ordering import ORDERS

        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        _int_at_least("order_window", self.order_window, 1)
        env_index, env_count = slurm_shard(os.environ)
        if self.num_shards is None:
            self.num_shards = env_count if env_count is not None else 1
        if self.shard_index is None:
            self.shard_index = env_index if env_index is not None else 0
        _int_at_least("num_shards", self.num_shards, 1)
        _int_at_least("shard_index", self.shard_index, 0)
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index must be < num_shards ({self.num_shards}), got {self.shard_index}")
        if self.max_rows is not None:
            _int_at_least("max_rows", self.max_rows, 0)
        if self.max_error_rate is not None and not (0.0 <= self.max_error_rate <= 1.0):
            raise ValueError(f"max_error_rate must be a fraction in [0, 1], got {self.max_error_rate}")
        _int_at_least("error_rate_min_rows", self.error_rate_min_rows, 1)
        _int_at_least("commit_every", self.commit_every, 1)
        if self.commit_interval_s <= 0:
            raise ValueError(f"commit_interval_s must be > 0, got {self.commit_interval_s}")
        if self.max_in_flight is not None:
            _int_at_least("max_in_flight", self.max_in_flight, 1)
        _int_at_least("read_batch_rows", self.read_batch_rows, 1)
        if self.log_interval_s <= 0:
            raise ValueError(f"log_interval_s must be > 0, got {self.log_interval_s}")
        self.data_parallel_size = parse_data_parallel_size(self.data_parallel_size)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor (--executor) must be one of {', '.join(EXECUTORS)}; got {self.executor!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address (--ray-address) needs executor 'ray' (--executor ray)")
        if self.data_parallel_size != 1 and self.device is not None and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} names one GPU, but data_parallel_size is "
                             f"{self.data_parallel_size!r}: each worker is given its own GPUs through "
                             "CUDA_VISIBLE_DEVICES; use --device cuda (or auto) and set CUDA_VISIBLE_DEVICES "
                             "to choose the GPUs")
        if isinstance(self.choice, str):
            self.choice = [c.strip() for c in self.choice.split(",") if c.strip()]
        # The engine's settings checked now (the model is resolved later): a bad value is a usage error
        # before anything loads, like every other option (exit 2), not a failure of the job.
        self.engine_config(self.model or "model")
        # Fail on a bad default now, not on the first row.
        self.default_structured_output()
        try:
            self.default_sampling()
        except ValueError as e:
            raise ValueError(f"default sampling: {e}") from None
        if self.n is not None and self.n > self.effective_max_num_seqs:
            raise ValueError(f"n (--n) {self.n} exceeds max_num_seqs (--max-num-seqs) {self.effective_max_num_seqs}: "
                             "a record's samples run together; ask for fewer samples or raise max_num_seqs")

    def _check_model_options(self) -> None:
        for name, value in (("model", self.model), ("revision", self.revision), ("tokenizer", self.tokenizer),
                            ("tokenizer_revision", self.tokenizer_revision)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a non-empty string, got {value!r}")
        if self.revision is not None and self.model is None:
            raise ValueError("revision (--revision) needs model (--model), a Hugging Face Hub id")
        if self.tokenizer_revision is not None and self.tokenizer is None:
            raise ValueError("tokenizer_revision (--tokenizer-revision) needs tokenizer (--tokenizer), a Hub id")

    def _check_prompt_options(self) -> None:
        if self.prompt_template is not None and self.prompt_template_file is not None:
            raise ValueError("give one of prompt_template (--prompt-template) and prompt_template_file "
                             "(--prompt-template-file), not both")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt (--system-prompt) must be a string, got {self.system_prompt!r}")
        # Read and compiled once here: a template that does not parse fails before any work,
        # and the text travels with these options (Ray actors may not see the file).
        self._template_text: Optional[str] = None
        if self.prompt_template_file is not None:
            try:
                with open(self.prompt_template_file, encoding="utf-8-sig") as f:  # a BOM is not template text
                    self._template_text = f.read()
            except OSError as e:
                raise ValueError(f"prompt_template_file (--prompt-template-file): cannot read "
                                 f"{self.prompt_template_file}: {e.strerror or e}") from None
            option = f"prompt_template_file (--prompt-template-file {self.prompt_template_file})"
        elif self.prompt_template is not None:
            self._template_text = self.prompt_template
            option = "prompt_template (--prompt-template)"
        if self._template_text is not None:
            from ..io.templates import PromptTemplate

            PromptTemplate(self._template_text, option)

    @property
    def template_text(self) -> Optional[str]:
        """The prompt template's source (from --prompt-template or the file), or None."""
        return self._template_text

    # -- building -------------------------------------------------------

    @classmethod
    def from_sources(cls, cli_values: Mapping[str, Any], job_file: Optional[str] = None) -> "JobOptions":
        """Merge a YAML job file (optional) with command-line values; the
        command line wins. ``None`` or an empty tuple on the command line
        means "not given"."""
        merged: dict[str, Any] = load_job_file(job_file) if job_file else {}
        for name, value in cli_values.items():
            if value is None or (isinstance(value, tuple) and not value):
                continue
            merged[name] = list(value) if isinstance(value, tuple) else value
        unknown = sorted(set(merged) - option_names())
        if unknown:
            raise ValueError(f"unknown job option(s): {', '.join(unknown)}")
        if "input" not in merged:
            raise ValueError("--input is required (on the command line or as 'input:' in the job file)")
        return cls(**merged)

    def engine_config(self, model_dir: str, tokenizer_dir: Optional[str] = None) -> EngineConfig:
        """The engine's config, with ``model`` (and ``tokenizer``) resolved to local directories."""
        values = {ENGINE_FIELDS[k]: getattr(self, k) for k in ENGINE_FIELDS if getattr(self, k) is not None}
        values["model"] = model_dir
        if tokenizer_dir is not None:
            values["tokenizer"] = tokenizer_dir
        return EngineConfig.from_dict(values)

    def default_sampling(self) -> dict[str, Any]:
        """The job's sampling defaults as given (validated, JSON-serialisable); rows override them."""
        values = {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}
        structured = self.default_structured_output()
        if structured is not None:
            values["structured_output"] = structured
        SamplingParams.from_dict(values)
        return values

    def default_structured_output(self) -> Optional[dict[str, Any]]:
        """``--json-schema`` / ``--regex`` / ``--choice`` as a ``StructuredOutputParams`` dict (the
        schema file read), or None; ValueError naming the option. Compiling it needs the tokenizer:
        the job does that before any work."""
        from ..structured_output import StructuredOutputError, StructuredOutputParams

        given = [(name, getattr(self, name)) for name in ("json_schema", "regex", "choice")
                 if getattr(self, name) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"give at most one of --json-schema, --regex and --choice; got "
                             f"{' and '.join('--' + n.replace('_', '-') for n, _ in given)}")
        name, value = given[0]
        option = structured_option_name(self)
        if name == "json_schema" and isinstance(value, dict):
            value = json.dumps(value)  # given inline (a YAML mapping)
        elif name == "json_schema":
            try:
                with open(value, encoding="utf-8") as f:
                    value = f.read()
            except OSError as e:
                raise ValueError(f"{option}: cannot read the schema file: {e}") from None
        try:
            params = StructuredOutputParams(**{"json" if name == "json_schema" else name: value})
        except StructuredOutputError as e:
            raise ValueError(f"{option}: {e.problem}") from None
        return params.to_dict()

    @property
    def effective_max_num_seqs(self) -> int:
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        return EngineConfig.__dataclass_fields__["max_num_seqs"].default

    @property
    def effective_max_in_flight(self) -> int:
        """Samples admitted to an engine at once (a record of n samples counts n; it is admitted whole)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return max(2 * self.effective_max_num_seqs, 16)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def structured_option_name(opts: JobOptions) -> str:
    """The job option that gives the rows' default structured output, as the user wrote it (for messages)."""
    if opts.json_schema is not None:
        return f"--json-schema {opts.json_schema}"
    return "--regex" if opts.regex is not None else "--choice"


def option_names() -> set[str]:
    return {f.name for f in dataclasses.fields(JobOptions)}


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "a mapping"}


def _describe(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if typing.get_origin(tp) is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(value: Any, tp) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is Union:
        return any(_fits(value, a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


# Options parsed by checks of their own, with messages saying what the text may hold.
_OWN_CHECKS = ("keep_columns", "data_parallel_size")


@functools.lru_cache(maxsize=None)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(JobOptions)


def _check_types(opts: JobOptions) -> None:
    """Each option's value has its declared type. The command line converts values itself; a YAML job file or
    ``generate_dataset(**options)`` may not: 'include_prompt: "false"' was taken as true, and 'max_num_seqs:
    "64"' failed later with a TypeError from deep in the engine. A ValueError naming the option instead."""
    for name, tp in _field_types().items():
        value = getattr(opts, name)
        if isinstance(value, tuple):  # the command line's multi-value options
            value = list(value)
            setattr(opts, name, value)
        if name in _OWN_CHECKS:
            continue
        if not _fits(value, tp):
            optional = " (or null)" if _fits(None, tp) else ""
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {_describe(tp)}{optional}, got {value!r}")


def load_job_file(path: str) -> dict[str, Any]:
    """A YAML job file's options (keys as in ``JobOptions``; '-' may stand
    for '_'). Unknown keys are an error that names them."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"job file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"job file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"job file {path} must be a mapping of option: value, got {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - option_names())
    if unknown:
        raise ValueError(f"job file {path}: unknown option(s) {', '.join(unknown)}; "
                         "see `pagedbatch run --help` or docs/jobs.md for the names")
    return values


def parse_data_parallel_size(value: Any) -> Union[int, str]:
    """An integer >= 1, or "auto" (every visible GPU); digits given as text become an int."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data_parallel_size (--data-parallel-size) must be an integer >= 1 or 'auto', got {value!r}")
    return value


def parse_keep_columns(value: Any) -> Union[list[str], str, None]:
    """None, "all", or a list of column names (a comma-separated string, as on the command line, works too)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() == "all":
            return "all"
        value = [name.strip() for name in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"keep_columns (--keep-columns) must be 'all' or a list of column names (a,b), got {value!r}")
    if "all" in value and len(value) > 1:
        raise ValueError("keep_columns (--keep-columns): 'all' cannot be combined with column names")
    if len(set(value)) != len(value):
        raise ValueError(f"keep_columns (--keep-columns) names a column twice: {value!r}")
    return "all" if list(value) == ["all"] else list(value)


def slurm_shard(env: Mapping[str, str]) -> tuple[Optional[int], Optional[int]]:
    """(shard index, shard count) from a Slurm job array, else from Slurm tasks, else (None, None)."""
    for index_var, count_var in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("SLURM_PROCID", "SLURM_NTASKS")):
        index, count = env.get(index_var), env.get(count_var)
        if index is not None and count is not None:
            try:
                # --array=1-4 numbers tasks from 1: shards count from the array's minimum.
                low = int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if index_var == "SLURM_ARRAY_TASK_ID" else 0
                return int(index) - low, int(count)
            except ValueError:
                raise ValueError(f"{index_var}={index!r} / {count_var}={count!r} are not integers") from None
    return None, None


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
