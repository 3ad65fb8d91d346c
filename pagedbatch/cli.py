"""The ``pagedbatch`` command: ``run`` (a batch job) and ``report OUT``.

Options are grouped in ``--help`` by section. Every ``run`` option can also
come from a YAML job file (``--config``); the command line wins, so options
here default to None ("not given") and the real defaults live in
``JobOptions``, ``EngineConfig`` and ``SamplingParams``.

Subcommands defined elsewhere (``serve``, the HTTP server) are added at the
bottom of this file; their modules import their heavy dependencies lazily.
"""
from __future__ import annotations

import shlex
import sys
from typing import Any, Optional

import click

from . import __version__
from .config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS, SCHEDULING_POLICIES

INPUT_FORMATS = ("jsonl", "parquet", "csv", "hf-disk", "hf", "openai")  # pagedbatch.io.FORMATS, without importing pyarrow

IO, MODEL, ENGINE, SAMPLING, CONTROL = "Input/Output", "Model", "Engine", "Sampling defaults (rows may override)", "Job control"
PARALLEL = "Parallelism"
_SECTIONS = (IO, MODEL, ENGINE, SAMPLING, CONTROL, PARALLEL)


class _Option(click.Option):
    """A click option that knows its ``--help`` section."""

    def __init__(self, *decls, section: str = CONTROL, **kw):
        super().__init__(*decls, **kw)
        self.section = section


class _SectionedCommand(click.Command):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                rows.setdefault(getattr(param, "section", "Other"), []).append(record)
        for section in (*_SECTIONS, "Other"):
            if rows.get(section):
                with formatter.section(section):
                    formatter.write_dl(rows[section])


def _opt(section: str, *decls, **kw):
    kw.setdefault("default", None)
    return click.option(*decls, cls=_Option, section=section, show_default=False, **kw)


def _flag(section: str, name: str, help: str):
    return _opt(section, f"--{name}/--no-{name}", default=None, help=help)


_RUN_OPTIONS = [
    # Input/Output
    _opt(IO, "--config", "config_file", type=click.Path(dir_okay=False),
         help="YAML job file with any of these options (snake_case keys); the command line wins."),
    _opt(IO, "--input", "-i", help="Input: .jsonl, .parquet (file or folder), .csv, a datasets save_to_disk folder, "
         "a local datasets file, or an OpenAI batch .jsonl file."),
    _opt(IO, "--output", "-o", help="Output folder OUT (results/, report.*, job.json). Default: out/<input name>."),
    _opt(IO, "--input-format", type=click.Choice(INPUT_FORMATS), help="Override the format detected from the file."),
    _opt(IO, "--prompt-field", help="Column holding the text prompt [prompt]."),
    _opt(IO, "--messages-field", help="Column holding chat messages [messages]."),
    _opt(IO, "--prompt-token-ids-field", help="Column holding prompt token ids [prompt_token_ids]."),
    _opt(IO, "--id-field", help="Column holding the row id [id]; default id: the row's index."),
    _opt(IO, "--prompt-template", help="Jinja2 template over each record's fields that makes its prompt, e.g. "
         "'Summarise: {{ article }}'; a record lacking a field it uses (or null there) becomes an error row. "
         "Multi-line: --prompt-template-file, a YAML job file, or bash $'...\\n...'."),
    _opt(IO, "--prompt-template-file", type=click.Path(dir_okay=False),
         help="The same, read from a file (e.g. prompts/summarise.j2)."),
    _opt(IO, "--system-prompt", help="Make each text prompt a chat [system, user] rendered with the model's chat "
         "template; chat messages get it first unless they start with a system message."),
    _opt(IO, "--keep-columns", help="Input columns to copy into the result rows with their types: a,b or all. "
         "Names that are result columns (id, output, ...) become input_<name>."),
    _opt(IO, "--output-format", type=click.Choice(("parquet", "jsonl")),
         help="parquet (always written) or jsonl: also OUT/output.jsonl in the OpenAI batch output format."),
    _flag(IO, "include-prompt", "Add the prompt (text, or chat messages as JSON) to each result row."),
    _flag(IO, "include-token-ids", "Add prompt_token_ids and output_token_ids columns."),
    _flag(IO, "include-logprobs", "Add the chosen tokens' log-probabilities."),
    _flag(IO, "overwrite", "Delete OUT's previous results, manifest and reports, and start over."),
    # Model
    _opt(MODEL, "--model", "-m", help="Hugging Face model directory, or a Hub id (Qwen/Qwen2.5-7B-Instruct) resolved "
         "through the Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1: the cache only). Without it: "
         "the built-in demo model (random weights, meaningless text)."),
    _opt(MODEL, "--revision", help="Hub revision of --model: a branch, tag or commit [main]."),
    _opt(MODEL, "--tokenizer", help="Tokenizer directory or Hub id [the model's]."),
    _opt(MODEL, "--tokenizer-revision", help="Hub revision of --tokenizer [main]."),
    _opt(MODEL, "--dtype", type=click.Choice(DTYPES), help="Weights and compute dtype [auto]."),
    _opt(MODEL, "--device", help="auto, cpu, cuda or cuda:N [auto]."),
    _opt(MODEL, "--load-format", type=click.Choice(LOAD_FORMATS), help="Weights format [auto]."),
    _flag(MODEL, "allow-pickle-weights", "Allow .bin (pickle) weights; they can run code."),
    _opt(MODEL, "--quantization", type=click.Choice(QUANTIZATIONS), help="fp8: linear weights in float8 e4m3 "
         "(quantized at load; GPU: compute capability >= 8.9) [none; fp8 checkpoints imply fp8]."),
    _opt(MODEL, "--engine-seed", type=int, help="Seed for random weights (dummy) and unseeded sampling [0]."),
    # Engine
    _opt(ENGINE, "--block-size", type=int,
         help="KV-cache block size in tokens [64 on a GPU under the Triton attention backend, else 16]."),
    _opt(ENGINE, "--kv-cache-memory-gb", type=float, help="CPU: KV-cache memory budget in GB [1.0]."),
    _opt(ENGINE, "--gpu-memory-utilization", type=float, help="GPU: fraction of memory the engine may use [0.9]."),
    _opt(ENGINE, "--num-kv-blocks", type=int, help="Exact number of KV blocks (overrides the memory budgets)."),
    _flag(ENGINE, "enable-prefix-caching", "Reuse KV blocks of shared prompt prefixes [on]."),
    _opt(ENGINE, "--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), help="KV-cache storage: auto (the model's "
         "dtype) or fp8 (e4m3 with the checkpoint's per-layer scales, else 1.0; twice the tokens) [auto]."),
    _opt(ENGINE, "--max-model-len", type=int, help="Longest prompt+output in tokens [the model's limit]."),
    _opt(ENGINE, "--max-num-seqs", type=int, help="Most sequences in one batch [256]."),
    _opt(ENGINE, "--max-num-batched-tokens", type=int, help="Token budget per engine step [8192]."),
    _opt(ENGINE, "--scheduling-policy", type=click.Choice(SCHEDULING_POLICIES), help="Scheduling policy [fcfs]."),
    _opt(ENGINE, "--sjf-max-skipped-steps", type=int, help="sjf-align starvation bound in steps [8]."),
    _opt(ENGINE, "--attention-backend", type=click.Choice(ATTENTION_BACKENDS), help="Attention backend [auto]."),
    _flag(ENGINE, "enforce-eager", "GPU: disable CUDA graphs."),
    _opt(ENGINE, "--prefill-graph-max-tokens", type=int, help="GPU: steps with prefill of up to this many tokens "
         "replay CUDA graphs too; 0: only decode steps do [8192]."),
    _opt(ENGINE, "--tensor-parallel-size", type=int, help="Split the model over N GPUs (cuda:0..N-1) or N CPU "
         "processes; N must divide the attention heads [1]."),
    _opt(ENGINE, "--tp-timeout-s", type=float, help="Tensor parallel: seconds rank 0 waits on a worker in a step "
         "before failing, naming the stuck rank [300]."),
    _opt(ENGINE, "--tp-setup-timeout-s", type=float, help="... and while loading, profiling and capturing graphs "
         "[1800]."),
    # Sampling defaults
    _opt(SAMPLING, "--max-tokens", type=int, help="Most output tokens per row [256]."),
    _opt(SAMPLING, "--min-tokens", type=int, help="Fewest output tokens before EOS may stop [0]."),
    _opt(SAMPLING, "--temperature", type=float, help="0 = greedy [1.0]."),
    _opt(SAMPLING, "--top-p", type=float, help="Nucleus sampling mass [1.0]."),
    _opt(SAMPLING, "--top-k", type=int, help="Top-k (0 = off) [0]."),
    _opt(SAMPLING, "--min-p", type=float, help="Min-p [0.0]."),
    _opt(SAMPLING, "--repetition-penalty", type=float, help="Hugging Face repetition penalty [1.0]."),
    _opt(SAMPLING, "--presence-penalty", type=float, help="OpenAI presence penalty [0.0]."),
    _opt(SAMPLING, "--frequency-penalty", type=float, help="OpenAI frequency penalty [0.0]."),
    _opt(SAMPLING, "--seed", type=int, help="Per-request sampling seed (reproducible sampling) [none]."),
    _opt(SAMPLING, "--stop", multiple=True, help="Stop string (repeatable)."),
    _opt(SAMPLING, "--stop-token-ids", help="Comma-separated token ids that stop generation."),
    _flag(SAMPLING, "ignore-eos", "Keep generating past EOS up to max_tokens."),
    _opt(SAMPLING, "--logprobs", type=int, help="Number of top alternatives to compute per token."),
    _flag(SAMPLING, "skip-special-tokens", "Drop special tokens from the output text [on]."),
    _opt(SAMPLING, "--n", type=int, help="Samples per record: n result rows, sample_index 0..n-1, the prompt "
         "computed once; sample j of a row seeded s is seeded sample_seed(s, j) [1]."),
    _opt(SAMPLING, "--json-schema", type=click.Path(dir_okay=False),
         help="Constrain every row's output to this JSON schema (a .json file); a row's response_format wins."),
    _opt(SAMPLING, "--regex", help="Constrain every row's output to match this regular expression."),
    _opt(SAMPLING, "--choice", help="Constrain every row's output to one of these comma-separated strings."),
    # Job control
    _opt(CONTROL, "--max-rows", type=int, help="Only the first N input records."),
    _opt(CONTROL, "--shard-index", type=int, help="This shard, 0-based [$SLURM_ARRAY_TASK_ID, $SLURM_PROCID, 0]."),
    _opt(CONTROL, "--num-shards", type=int, help="Shard count [$SLURM_ARRAY_TASK_COUNT, $SLURM_NTASKS, 1]."),
    _opt(CONTROL, "--max-error-rate", type=float, help="Abort when more than this fraction of rows failed "
         "(after --error-rate-min-rows rows) [off]."),
    _opt(CONTROL, "--error-rate-min-rows", type=int, help="Rows processed before --max-error-rate applies [20]."),
    _opt(CONTROL, "--commit-every", type=int, help="Commit a results part every N rows [1000]."),
    _opt(CONTROL, "--commit-interval-s", type=float, help="... or every S seconds, whichever first [60]."),
    _opt(CONTROL, "--max-in-flight", type=int, help="Samples admitted to the engine at once (a record of n counts "
         "n) [2 x max-num-seqs]."),
    _opt(CONTROL, "--order", type=click.Choice(["input", "length", "prefix"]),
         help="Admission order within a window: as read, shortest prompt first, or rows sharing a prefix "
              "together [input]. Results are keyed by index whatever the order."),
    _opt(CONTROL, "--order-window", type=int, help="Rows held for --order (bounds memory) [4096]."),
    _opt(CONTROL, "--read-batch-rows", type=int, help="Input rows read per batch [1024]."),
    _flag(CONTROL, "quiet", "No progress bar or periodic log lines."),
    _opt(CONTROL, "--log-interval-s", type=float, help="Seconds between log lines when not on a terminal [10]."),
    # Parallelism
    _opt(PARALLEL, "--data-parallel-size", help="Engine worker processes, each on its own GPU (or tensor-parallel "
         "group of GPUs) and fed rows on demand; 'auto' = every visible GPU (1 on a CPU machine). On the CPU, N "
         "workers share the cores [1: the engine runs in this process]. With --executor ray: engine actors."),
    _opt(PARALLEL, "--executor", type=click.Choice(["local", "ray"]),
         help="local: this machine; ray: Ray Data on a Ray cluster, one engine actor per GPU (pip install "
              "\"pagedbatch[ray]\") [local]."),
    _opt(PARALLEL, "--ray-address", help="Ray cluster to join with --executor ray (e.g. auto, ray://host:10001) "
         "[start a local one]."),
]


def _run(config_file: Optional[str], **values: Any) -> None:
    """Run (or resume) a batch job: stream INPUT through the model into OUT/results (Parquet).

    Rerunning the same command on the same OUT resumes where it stopped.
    """
    from .jobs.options import JobOptions
    from .jobs.runner import JobError, JobUsageError, run_job

    ids = values.get("stop_token_ids")
    if ids is not None:
        try:
            values["stop_token_ids"] = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {ids!r}", param_hint="--stop-token-ids")
    try:
        opts = JobOptions.from_sources(values, config_file)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        result = run_job(opts, resume_command=_resume_command())
    except JobUsageError as e:
        raise click.UsageError(str(e)) from None
    except JobError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("[pagedbatch] interrupted; finished rows were committed. Rerun the same command to resume.",
                   err=True)
        sys.exit(130)
    click.echo(f"[pagedbatch] {result.message}", err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


def _resume_command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv.insert(0, "python")
    elif argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "pagedbatch"
    return " ".join(shlex.quote(a) for a in argv)


def _build_run_command() -> click.Command:
    fn = _run
    for option in reversed(_RUN_OPTIONS):
        fn = option(fn)
    return click.command("run", cls=_SectionedCommand, context_settings={"max_content_width": 110})(fn)


run = _build_run_command()


@click.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--no-png", is_flag=True, help="Skip report.png.")
def report(out: str, no_png: bool) -> None:
    """Rebuild OUT/report.json, report.md and report.png over every committed part (all shards)."""
    import os

    from .jobs.manifest import MANIFEST, RESULTS, ManifestMismatch, job_model_name, read_manifest
    from .jobs.report import write_report

    # Only a job's OUT: run on any other folder it wrote report files into it, exit 0.
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        raise click.ClickException(f"{out} is not a pagedbatch job's output directory (it has no {MANIFEST}); "
                                   "give the --output of a `pagedbatch run`")
    try:
        manifest = read_manifest(out) or {}
    except ManifestMismatch as e:
        raise click.ClickException(str(e)) from None
    try:
        r = write_report(out, png=not no_png)
    except ValueError as e:  # a damaged result part, named with what to do
        raise click.ClickException(str(e)) from None
    if manifest.get("settings", {}).get("output_format") == "jsonl" and r["status"] == "complete":
        from .io import write_openai_batch_output

        write_openai_batch_output(os.path.join(out, RESULTS), os.path.join(out, "output.jsonl"),
                                  model=job_model_name(out))
    click.echo(f"{r['rows']['total']} rows ({r['rows']['failed']} failed), status {r['status']}; "
               f"wrote {out}/report.json and report.md", err=True)


from .server.cli import serve  # noqa: E402  (after run/report so --help lists them first)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="pagedbatch")
def cli() -> None:
    """pagedbatch: offline batch inference with a paged-attention engine."""


cli.add_command(run)
cli.add_command(report)
cli.add_command(serve)


def main() -> None:
    cli(prog_name="pagedbatch")


if __name__ == "__main__":
    main()
