"""bench/n_samples.py runs end to end (the smoke mode on the CPU); the speed itself is measured on the GPU."""
import json

from bench_scripts import load_bench


def test_n_samples_benchmark_smoke_run_gives_the_copies_samples_with_the_prompt_computed_once(tmp_path, capsys):
    bench = load_bench("n_samples")
    assert bench.main(["--workload", "tiny", "--device", "cpu", "--num-kv-blocks", "256", "--max-num-seqs", "64",
                       "--results-dir", str(tmp_path)]) == 0
    assert "vs copies" in capsys.readouterr().out
    [path] = tmp_path.glob("n-samples-tiny-*.json")
    rows = {(r["variant"], r["prefix_caching"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {("n=8", True), ("8 copies", True), ("n=8", False), ("8 copies", False)}
    prompt_tokens = rows["n=8", False]["prefill_tokens"]
    assert rows["n=8", True]["prefill_tokens"] == prompt_tokens and rows["8 copies", False]["prefill_tokens"] > 7 * prompt_tokens
    assert rows["n=8", False]["forked_seqs"] == 7 * 8
    # float32 on the CPU: the n=8 requests draw exactly the copies' samples.
    assert all(r["same_tokens_fraction"] == 1.0 for r in rows.values())
