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
    # Each run's steps with prefill split by part (the timed run's too): one step each here.
    assert len(re.findall(r"^ +1 steps with prefill: wall \d+ ms = fwd \d+, prep \d+, lm \d+, samp \d+, coll \d+, wait \d+, sched \d+, "
                          r"cache \d+; \d+ cudaMalloc, gc \d+ ms$", out, re.M)) == 3


def test_profile_steps_lists_the_first_steps_one_by_one_with_their_shape_and_parts(capsys):
    bench = load_bench("profile_steps")
    assert bench.main(["--workload", "tiny", "--device", "cpu", "--profile-steps", "1", "--step-detail", "3",
                       "--warm-lm-head", "--max-num-seqs", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^LM head run at 1\.\.8 rows before the timed run: [\d.]+ s$", out, re.M)
    assert "step kind  rows tokens decode   wall    fwd   prep     lm   samp   coll   wait  sched  cache malloc  free  +MiB     gc" \
        in out
    rows = re.findall(r"^ +(\d+) +([wd]) +(\d+) +(\d+) +(\d+)((?: +[\d.]+){9}) +(\d+) +(\d+) +(-?\d+) +([\d.]+)$",
                      out, re.M)
    # tiny: one step prefills all 8 prompts (131 tokens), then every row decodes; only the first 3 are listed.
    assert [r[:5] for r in rows] == [("0", "w", "8", "131", "0"), ("1", "d", "8", "8", "8"), ("2", "d", "8", "8", "8")]
    for r in rows:
        wall, fwd, prep, lm = (float(x) for x in r[5].split()[:4])
        assert 0 < lm <= fwd <= wall and prep <= fwd  # the LM head and inputs inside the forward's launches
