"""bench/decode_attention.py runs on the CPU (the interpreter, its tiny cases): each config is checked against the
torch reference on the cache as the engine lays it out, here at a KV block size other than the cases' 16 (the
sweep a GPU call runs with --block-size)."""
import re

import pytest

pytest.importorskip("triton")

from bench_scripts import load_bench  # noqa: E402


def test_decode_attention_bench_runs_the_default_configs_at_a_64_token_block(capsys):
    bench = load_bench("decode_attention")
    assert bench.main(["--device", "cpu", "--quick", "--cases", "wnano", "--block-size", "64",
                       "--configs", "v2-f8mma-pack-vtail-waves,v2-lt-waves"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^wnano (bf16|fp8): .* block 64;", out, re.M) == ["bf16", "fp8"], out
    assert "[wnano fp8] 2 configs correct, 0 wrong or failing" in out, out


def test_decode_attention_bench_refuses_a_block_size_not_a_power_of_two():
    bench = load_bench("decode_attention")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--quick", "--block-size", "48"])
