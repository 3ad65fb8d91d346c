"""bench/throughput.py runs end to end on the CPU (tiny workload, no peers); speed is measured on the GPU."""
import json
import statistics

from bench_scripts import load_bench


def test_throughput_repeat_times_our_engine_n_times_and_reports_the_median(tmp_path, capsys):
    bench = load_bench("throughput")
    assert bench.main(["--workload", "tiny", "--device", "cpu", "--dtype", "float32", "--peers", "none",
                       "--sustained-s", "0", "--repeat", "3", "--results-dir", str(tmp_path)]) == 0
    assert "the median of 3 runs" in capsys.readouterr().out
    [path] = tmp_path.glob("tiny-*.json")
    [ours] = json.loads(path.read_text())["rows"]
    assert len(ours["wall_s_runs"]) == 3
    assert ours["wall_s"] == statistics.median(ours["wall_s_runs"])
    assert ours["output_tokens"] == 64  # every run answered every prompt in full (checked inside for each run)


def test_throughput_records_name_the_kv_cache_dtype_and_never_overwrite_one_another(tmp_path):
    # A bf16 and an fp8-KV run of one workload, tag and day wrote the same file name: the second replaced the first.
    bench = load_bench("throughput")
    base = ["--workload", "tiny", "--device", "cpu", "--dtype", "float32", "--peers", "none", "--sustained-s", "0",
            "--results-dir", str(tmp_path), "--tag", "t"]
    for extra in ([], ["--kv-cache-dtype", "fp8"], []):
        assert bench.main(base + extra) == 0
    names = sorted(p.name for p in tmp_path.glob("tiny-*.json"))
    assert len(names) == 3 and sum(n.endswith("-kv8t.json") for n in names) == 1
    assert sum(n.endswith("t-2.json") for n in names) == 1
