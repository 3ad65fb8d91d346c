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


def test_profile_steps_times_the_forwards_parts_per_call_with_the_longest(capsys):
    bench = load_bench("profile_steps")
    assert bench.main(["--workload", "tiny", "--device", "cpu", "--profile-steps", "1", "--step-detail", "0",
                       "--time-parts"]) == 0
    out = capsys.readouterr().out
    parts = {m[0]: (int(m[2]), float(m[3]), float(m[4])) for m in re.findall(
        r"^ +part: ([\w.]+(?: \(with o_proj\))?): +([\d.]+) s over (\d+) calls, ([\d.]+) ms/call, longest ([\d.]+) ms$",
        out, re.M)}
    attend = parts.pop("Attention.attend (with o_proj)")
    assert attend[0] > 0
    # Every layer of every step: one attention (o_proj inside it), qkv's and gate_up's norm_linear, one down.
    assert parts["llama.norm_linear"][0] == 2 * attend[0]
    assert parts["llama.silu_mul_linear"][0] == attend[0]
    assert parts["backend.forward"][0] == attend[0]
    for calls, per_call, longest in parts.values():
        assert longest >= per_call > 0


def test_profile_steps_repeated_runs_alternate_the_prefill_v_tile_in_one_process(capsys):
    from pagedbatch.engine.attention import triton_backend

    bench = load_bench("profile_steps")
    before = triton_backend.PREFILL_V_TILE
    try:
        assert bench.main(["--workload", "tiny", "--device", "cpu", "--runs", "3", "--runs-v-tiles", "0,16",
                           "--profile-steps", "1", "--step-detail", "0"]) == 0
    finally:
        triton_backend.PREFILL_V_TILE = before
    out = capsys.readouterr().out
    assert re.findall(r"run (\d) \(prefill V tile (\d+)\): [\d.]+ s", out) == [("1", "0"), ("2", "16"), ("3", "0")]
