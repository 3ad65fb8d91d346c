"""bench/profile_steps.py runs end to end on the CPU (tiny workload); what it measures is for the GPU."""
import re

from bench_scripts import load_bench


def test_profile_steps_repeated_runs_each_report_the_whole_workload_split_by_step_kind(capsys):
    bench = load_bench("profile_steps")
    assert bench.main(["--workload", "tiny", "--device", "cpu", "--runs", "2", "--profile-steps", "1"]) == 0
    out = capsys.readouterr().out
    runs = re.findall(r"run (\d): [\d.]+ s, [\d,]+ output tok/s; (\d+) steps with prefill [\d.]+ s, (\d+) decode-only "
                      r"[\d.]+ s; gc \d+ ms in \d+ collections", out)
    # tiny: 8 prompts of up to 32 tokens, 8 new tokens each: one step prefills them all, 8 more decode.
    assert runs == [("1", "1", "8"), ("2", "1", "8")]
