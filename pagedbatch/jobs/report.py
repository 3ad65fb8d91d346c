"""OUT/report.json, report.md and report.png, rebuilt from what OUT holds.

Row counts, tokens and latency percentiles come from the committed Parquet
parts alone (all shards, all runs). A record asked for n samples has n rows:
``rows`` counts rows (samples), ``records`` the records (one request each),
and prompt tokens count each record's prompt once (its samples share it).
Wall time, throughput over time and the engine's statistics (KV-cache use, preemptions, prefix-cache hits, batch
shapes) come from the progress logs the runs append to; where a log is
missing those read "n/a".
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
from typing import Any, Optional

from .manifest import RESULTS, read_manifest
from .progress import read_progress

_ROW_COLUMNS = ["index", "finish_reason", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "latency_s",
                "queue_s", "num_preemptions", "shard"]
_PERCENTILES = (50, 90, 99)


def build_report(out: str) -> dict[str, Any]:
    """The report of everything committed in OUT, as a JSON-able dict."""
    manifest = read_manifest(out) or {}
    rows = _row_metrics(os.path.join(out, RESULTS))
    events = read_progress(out)
    runs = _runs(events)
    wall = _union_length([(r["start"], r["end"]) for r in runs.values()])
    engine = _engine_metrics(runs)
    start = next((r["start_event"] for r in sorted(runs.values(), key=lambda r: -r["start"])
                  if r.get("start_event")), {})
    settings = manifest.get("settings", {})
    total_tokens = rows["prompt_tokens"] + rows["output_tokens"]
    report = {
        "output_dir": os.path.abspath(out),
        "status": _status(runs, settings.get("num_shards", 1)),
        "input": manifest.get("input", {}).get("path"),
        "rows": {"total": rows["total"], "ok": rows["ok"], "failed": rows["failed"],
                 "finish_reasons": rows["finish_reasons"]},
        "records": rows["records"],
        "tokens": {"prompt": rows["prompt_tokens"], "output": rows["output_tokens"], "total": total_tokens},
        "time": {
            "wall_s": wall if runs else None,
            "runs": len(runs),
            "requests_per_s": _rate(rows["records"]["total"], wall),
            "rows_per_s": _rate(rows["total"], wall),
            "output_tokens_per_s": _rate(rows["output_tokens"], wall),
            "total_tokens_per_s": _rate(total_tokens, wall),
        },
        "latency": rows["latency"],
        "kv_cache": engine["kv_cache"],
        "preemptions": engine["preemptions"],
        "prefix_cache_hit_rate": engine["prefix_cache_hit_rate"],
        "batching": engine["batching"],
        "model": start.get("model") or settings.get("model"),
        "dtype": start.get("dtype"),
        "quantization": start.get("quantization"),
        "device": start.get("device"),
        "device_name": start.get("device_name"),
        "engine_config": start.get("engine_config"),
        "job_options": manifest.get("options"),
        "workers": _workers(events),
        "throughput_timeline": _timeline(events),
    }
    return report


def write_report(out: str, *, png: bool = True) -> dict[str, Any]:
    """Build the report and write report.json, report.md and (optionally) report.png."""
    report = build_report(out)
    _write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    _write_text(os.path.join(out, "report.md"), render_markdown(report))
    if png:
        try:
            write_png(report, out)
        except Exception as e:  # a plot is a nicety; never fail the job over it
            report["png_error"] = f"{type(e).__name__}: {e}"
    return report


# --- rows -------------------------------------------------------------------


def _row_metrics(results_dir: str) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = sorted(glob.glob(os.path.join(results_dir, "part-*.parquet")))
    empty = {"total": 0, "ok": 0, "failed": 0, "finish_reasons": {}, "prompt_tokens": 0, "output_tokens": 0,
             "records": {"total": 0, "ok": 0, "failed": 0},
             "latency": {k: _percentiles([]) for k in ("ttft_s", "tpot_s", "latency_s", "queue_s")}}
    if not files:
        return empty
    import pyarrow as pa

    from ..io.parquet_writer import read_part_schema

    # Parts written before n samples lack sample_index: unified, it reads null there.
    schema = pa.unify_schemas([read_part_schema(f) for f in files])
    columns = _ROW_COLUMNS + (["sample_index"] if "sample_index" in schema.names else [])
    table = ds.dataset(files, schema=schema, format="parquet").to_table(columns=columns)
    reasons = table.column("finish_reason").value_counts().to_pylist()
    finish = {r["values"] if r["values"] is not None else "null": r["counts"] for r in reasons}
    failed = finish.get("error", 0)
    ok_mask = pc.not_equal(pc.fill_null(table.column("finish_reason"), ""), "error")
    ok = table.filter(ok_mask)
    latency = {k: _percentiles(ok.column(k).drop_null().to_pylist()) for k in ("ttft_s", "tpot_s", "latency_s", "queue_s")}
    # A record failed when any of its rows did (a request the engine fails, fails all its samples).
    records = pc.count_distinct(table.column("index")).as_py()
    failed_records = pc.count_distinct(table.filter(pc.invert(ok_mask)).column("index")).as_py()
    return {
        "total": table.num_rows,
        "ok": table.num_rows - failed,
        "failed": failed,
        "finish_reasons": dict(sorted(finish.items())),
        # Error rows' prompts were refused (too long, bad ids) or never finished: not tokens the engine served.
        "prompt_tokens": int(pc.sum(_first_samples(ok).column("prompt_tokens")).as_py() or 0),
        "output_tokens": int(pc.sum(table.column("output_tokens")).as_py() or 0),
        "records": {"total": records, "ok": records - failed_records, "failed": failed_records},
        "latency": latency,
    }


def _first_samples(table):
    """One row per record: its sample 0 (every record has one; older parts have no sample_index)."""
    import pyarrow.compute as pc

    if "sample_index" not in table.column_names:
        return table
    return table.filter(pc.fill_null(pc.equal(table.column("sample_index"), 0), True))


def _percentiles(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in _PERCENTILES}}
    values = sorted(values)
    out: dict[str, Optional[float]] = {"mean": sum(values) / len(values)}
    for p in _PERCENTILES:
        # Linear interpolation between closest ranks (numpy's default).
        pos = (len(values) - 1) * p / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{p}"] = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return out


# --- runs and engine statistics ----------------------------------------------


def _runs(events: list[dict]) -> dict[tuple, dict]:
    runs: dict[tuple, dict] = {}
    for e in events:
        key = (e.get("shard"), e.get("run_id"))
        r = runs.setdefault(key, {"start": e["t"], "end": e["t"], "start_event": None, "last_stats": {},
                                  "end_event": None})
        r["start"], r["end"] = min(r["start"], e["t"]), max(r["end"], e["t"])
        if e.get("event") == "start":
            r["start_event"] = e
        if e.get("stats"):
            # Each data-parallel worker has its own engine (worker None: the single-process job's).
            r["last_stats"][e.get("worker")] = e["stats"]
        if e.get("event") == "end":
            r["end_event"] = e
    return runs


def _status(runs: dict[tuple, dict], num_shards: int) -> str:
    if not runs:
        return "unknown (no progress log)"
    latest: dict[Any, dict] = {}
    for (shard, _), r in runs.items():
        if shard not in latest or r["start"] > latest[shard]["start"]:
            latest[shard] = r
    states = {shard: (r["end_event"] or {}).get("status", "running or killed") for shard, r in latest.items()}
    if len(states) >= num_shards and all(s == "complete" for s in states.values()):
        return "complete"
    parts = [f"shard {shard}: {state}" for shard, state in sorted(states.items(), key=lambda kv: str(kv[0]))]
    missing = num_shards - len(states)
    if missing > 0:
        parts.append(f"{missing} shard(s) not started")
    return "partial (" + "; ".join(parts) + ")"


def _engine_metrics(runs: dict[tuple, dict]) -> dict[str, Any]:
    stats = [s for r in runs.values() for s in r["last_stats"].values()]
    if not stats:
        return {"kv_cache": {"peak_used_blocks": None, "num_blocks": None, "peak_fraction": None},
                "preemptions": None, "prefix_cache_hit_rate": "n/a", "batching": None}
    peak = max(stats, key=lambda s: s.get("peak_used_blocks", 0) / max(s.get("num_blocks", 1), 1))
    hit = "n/a"
    rated = [s for s in stats if "prefix_cache_hit_rate" in s]
    if rated:
        weights = [max(s.get("prefill_tokens", 0), 0) for s in rated]
        total = sum(weights)
        hit = (sum(w * s["prefix_cache_hit_rate"] for w, s in zip(weights, rated)) / total if total
               else sum(s["prefix_cache_hit_rate"] for s in rated) / len(rated))
    decode_steps = sum(s.get("decode_steps", 0) for s in stats)

    def weighted(key: str) -> Optional[float]:
        if not decode_steps:
            return None
        return sum(s.get(key, 0.0) * s.get("decode_steps", 0) for s in stats) / decode_steps

    return {
        "kv_cache": {
            "peak_used_blocks": peak.get("peak_used_blocks"),
            "num_blocks": peak.get("num_blocks"),
            "block_size": peak.get("block_size"),
            "peak_fraction": peak.get("peak_used_blocks", 0) / peak["num_blocks"] if peak.get("num_blocks") else None,
        },
        "preemptions": sum(s.get("preemptions", 0) for s in stats),
        "prefix_cache_hit_rate": hit,
        "batching": {
            "steps": sum(s.get("steps", 0) for s in stats),
            "decode_steps": decode_steps,
            "prefill_tokens": sum(s.get("prefill_tokens", 0) for s in stats),
            "mean_decode_batch": weighted("mean_decode_batch"),
            "padding_free_fraction": weighted("padding_free_fraction"),
            "mean_length_spread": weighted("mean_length_spread"),
        },
    }


def _workers(events: list[dict]) -> list[dict[str, Any]]:
    """A row per data-parallel worker of each run: its device and, from its
    last event, its rows, tokens and output rate since the run started."""
    starts: dict[tuple, dict] = {}
    last: dict[tuple, dict] = {}
    for e in events:
        key = (e.get("shard"), e.get("run_id"))
        if e.get("event") == "start":
            starts[key] = e
        elif e.get("worker") is not None and e.get("worker_counters"):
            last[(*key, e["worker"])] = e
    rows = []
    for (shard, run_id, worker), e in last.items():
        start = starts.get((shard, run_id), {})
        # Local workers are listed when the run starts; Ray actors name their device in their own events.
        info = next((w for w in start.get("workers", []) if w.get("worker") == worker), None) or e
        c = e["worker_counters"]
        wall = e["t"] - start["t"] if start else None
        rows.append({
            "shard": shard, "run_id": run_id, "worker": worker, "device": info.get("device"),
            "device_name": info.get("device_name"), "placement": info.get("placement"),
            "status": e.get("status") if e.get("event") == "worker_end" else "running or killed",
            "rows": c.get("rows", 0), "errors": c.get("errors", 0), "prompt_tokens": c.get("prompt_tokens", 0),
            "output_tokens": c.get("output_tokens", 0), "wall_s": wall,
            "output_tokens_per_s": _rate(c.get("output_tokens", 0), wall or 0.0),
            "_t0": start.get("t", 0.0),
        })
    rows.sort(key=lambda r: (r.pop("_t0"), str(r["shard"]), str(r["worker"])))
    return rows


def _union_length(intervals: list[tuple[float, float]]) -> float:
    # Shards that run at once overlap; resumes hours apart must not count the gap.
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _rate(n: float, seconds: float) -> Optional[float]:
    return n / seconds if seconds > 0 else None


def _timeline(events: list[dict]) -> list[dict[str, float]]:
    """Output tokens/s between consecutive commits of each run, as points
    (wall-clock t, tokens/s, rows/s); the report's throughput-over-time."""
    last: dict[tuple, dict] = {}
    points = []
    for e in events:
        key = (e.get("shard"), e.get("run_id"))
        if e.get("event") == "start":
            last[key] = {"t": e["t"], "output_tokens": 0, "rows": 0}
            continue
        if e.get("event") not in ("commit", "end") or key not in last or "counters" not in e:
            continue
        prev, c = last[key], e["counters"]
        dt = e["t"] - prev["t"]
        if dt > 0 and c["rows"] > prev["rows"]:
            points.append({"t": e["t"], "dt": dt, "output_tokens": c["output_tokens"] - prev["output_tokens"],
                           "rows": c["rows"] - prev["rows"]})
        last[key] = {"t": e["t"], "output_tokens": c["output_tokens"], "rows": c["rows"]}
    return points


# --- rendering ----------------------------------------------------------------


def render_markdown(r: dict[str, Any]) -> str:
    t, lat, kv, b = r["time"], r["latency"], r["kv_cache"], r["batching"] or {}
    lines = [
        "# pagedbatch job report",
        "",
        f"- Output: `{r['output_dir']}`",
        f"- Input: `{r['input']}`",
        f"- Status: **{r['status']}**",
        f"- Model: `{r['model']}` ({r['dtype']}{', fp8 weights' if r.get('quantization') == 'fp8' else ''}) "
        f"on {r['device']} ({r['device_name']})",
        "",
        "## Rows and throughput",
        "",
        "| metric | value |",
        "|---|---|",
        f"| rows | {r['rows']['total']} |",
        f"| rows ok | {r['rows']['ok']} |",
        f"| rows failed | {r['rows']['failed']} |",
        f"| records (one request each; n samples make n rows) | {r['records']['total']} "
        f"({r['records']['failed']} failed) |",
        f"| finish reasons | {', '.join(f'{k}: {v}' for k, v in r['rows']['finish_reasons'].items()) or '-'} |",
        f"| prompt tokens | {r['tokens']['prompt']} |",
        f"| output tokens | {r['tokens']['output']} |",
        f"| wall time (s) | {_fmt(t['wall_s'])} over {t['runs']} run(s) |",
        f"| requests (records)/s | {_fmt(t['requests_per_s'])} |",
        f"| rows/s | {_fmt(t['rows_per_s'])} |",
        f"| output tokens/s | {_fmt(t['output_tokens_per_s'])} |",
        f"| total tokens/s | {_fmt(t['total_tokens_per_s'])} |",
        "",
        "## Latency (successful rows, seconds)",
        "",
        "| | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("ttft_s", "time to first token"), ("tpot_s", "time per output token"),
                        ("latency_s", "end-to-end latency"), ("queue_s", "queue wait")):
        v = lat[name]
        lines.append(f"| {label} | {_fmt(v['mean'])} | {_fmt(v['p50'])} | {_fmt(v['p90'])} | {_fmt(v['p99'])} |")
    hit = r["prefix_cache_hit_rate"]
    lines += [
        "",
        "## Engine",
        "",
        "| metric | value |",
        "|---|---|",
        f"| peak KV-cache use | {_fmt(kv.get('peak_used_blocks'))} of {_fmt(kv.get('num_blocks'))} blocks "
        f"({_pct(kv.get('peak_fraction'))}) |",
        f"| preemptions | {_fmt(r['preemptions'])} |",
        f"| prefix-cache hit rate | {_pct(hit) if isinstance(hit, (int, float)) else hit} |",
        f"| engine steps | {_fmt(b.get('steps'))} ({_fmt(b.get('decode_steps'))} with decodes) |",
        f"| mean decode batch | {_fmt(b.get('mean_decode_batch'))} |",
        f"| padding-free decode steps | {_pct(b.get('padding_free_fraction'))} |",
        f"| mean length spread in a decode batch | {_fmt(b.get('mean_length_spread'))} |",
    ]
    lines += _render_workers(r.get("workers") or [])
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps({"engine": r["engine_config"], "job": r["job_options"]}, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def _render_workers(workers: list[dict]) -> list[str]:
    if not workers:
        return []
    lines = ["", "## Data-parallel workers", "",
             "| run | worker | device | rows | errors | output tokens | wall (s) | output tok/s | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (_, run_id), group in itertools.groupby(workers, key=lambda w: (w["shard"], w["run_id"])):
        group = list(group)
        for w in group:
            lines.append(f"| {run_id} | {w['worker']} | {w['device']} ({w['placement']}) | {w['rows']} | "
                         f"{w['errors']} | {w['output_tokens']} | {_fmt(w['wall_s'])} | "
                         f"{_fmt(w['output_tokens_per_s'])} | {w['status']} |")
        walls = [w["wall_s"] for w in group if w["wall_s"] is not None]
        wall, tokens = (max(walls) if walls else None), sum(w["output_tokens"] for w in group)
        lines.append(f"| {run_id} | all {len(group)} | | {sum(w['rows'] for w in group)} | "
                     f"{sum(w['errors'] for w in group)} | {tokens} | {_fmt(wall)} | "
                     f"{_fmt(_rate(tokens, wall or 0.0))} | |")
    return lines


def write_png(report: dict[str, Any], out: str) -> None:
    # matplotlib's object API on its Agg canvas, not pyplot: no global figure state or backend choice (a job
    # may run inside a user's notebook), and pyplot's import and tight_layout were 0.5 s of a small job's end.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import pyarrow.dataset as ds
    import pyarrow.compute as pc

    files = sorted(glob.glob(os.path.join(out, RESULTS, "part-*.parquet")))
    latencies: list[float] = []
    if files:
        table = ds.dataset(files, format="parquet").to_table(columns=["latency_s", "finish_reason"])
        ok = table.filter(pc.not_equal(pc.fill_null(table.column("finish_reason"), ""), "error"))
        latencies = ok.column("latency_s").drop_null().to_pylist()
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    if latencies:
        ax1.hist(latencies, bins=min(50, max(5, len(latencies) // 5)), color="#4c72b0")
        for p, style in ((50, "--"), (99, ":")):
            v = report["latency"]["latency_s"][f"p{p}"]
            if v is not None:
                ax1.axvline(v, color="k", linestyle=style, label=f"p{p} {v:.3g}s")
        ax1.legend()
    ax1.set_title("End-to-end latency")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("requests")
    points = report["throughput_timeline"]
    if points:
        t0 = min(p["t"] - p["dt"] for p in points)
        xs = [p["t"] - t0 for p in points]
        ys = [p["output_tokens"] / p["dt"] for p in points]
        ax2.step([0.0] + xs, [ys[0]] + ys, where="pre", color="#dd8452")
        ax2.plot(xs, ys, ".", color="#dd8452")
    ax2.set_title("Output throughput between commits")
    ax2.set_xlabel("seconds since first start")
    ax2.set_ylabel("output tokens/s")
    fig.suptitle(f"pagedbatch: {report['rows']['total']} rows, status {report['status']}", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.13, top=0.87, wspace=0.2)
    tmp = os.path.join(out, f".tmp-report.png.{os.getpid()}")
    fig.savefig(tmp, dpi=90, format="png")
    os.replace(tmp, os.path.join(out, "report.png"))


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _write_text(path: str, text: str) -> None:
    # Shards finishing together each rebuild the report: private temporaries, atomic rename.
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)  # a full disk must not leave it behind
        except FileNotFoundError:
            pass
        raise
