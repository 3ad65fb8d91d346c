"""bench/decode_stream_probe.py runs on the CPU (its kernel in Triton's interpreter, bench/decode_attention.py's
tiny cases): the probe a GPU call will run reads exactly the K and V words the engine's decode kernel reads (its
checksum of them equals the cache's), split or not, bf16 cache or fp8 with the key-contiguous V."""
import re

import pytest

pytest.importorskip("triton")

from bench_scripts import load_bench  # noqa: E402


@pytest.mark.parametrize("case,num_sms,stages,block", [("wnano", "1", "1,3", "16"), ("w1", "2", "3", "16"),
                                                      ("wnano", "1", "3", "64")],
                         ids=["unsplit", "split", "block64"])
def test_decode_stream_probe_reads_the_bytes_the_engine_reads(capsys, case, num_sms, stages, block):
    bench = load_bench("decode_stream_probe")
    assert bench.main(["--device", "cpu", "--cases", case, "--num-sms", num_sms, "--stages", stages,
                       "--block-size", block]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(\w+)\s+(bf16|fp8)\s+probe .* splits\s+(\d+) .* stages (\d)\s+checksum ok$", out, re.M)
    assert {(c, d, s) for c, d, _, s in rows} == {(case, d, s) for d in ("bf16", "fp8") for s in stages.split(",")}, out
    splits = {int(n) for _, _, n, _ in rows}
    assert (splits == {1}) if num_sms == "1" else (min(splits) > 1), out


def test_decode_stream_probe_names_an_unknown_case():
    bench = load_bench("decode_stream_probe")
    with pytest.raises(SystemExit, match="unknown 'nano'"):
        bench.main(["--device", "cpu", "--cases", "nano"])
