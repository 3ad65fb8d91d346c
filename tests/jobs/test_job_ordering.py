"""--order re-orders admission inside a bounded window and never changes what is written."""
from __future__ import annotations

import random

import pytest
from job_helpers import FAST, results, run_cli, write_jsonl

from pagedbatch.jobs.ordering import admission_order


def _tracked(items, consumed):
    for it in items:
        consumed.append(it)
        yield it


@pytest.mark.parametrize("order", ["length", "prefix"])
@pytest.mark.parametrize("window", [1, 3, 7, 100])
def test_window_never_holds_more_rows_than_the_window(order, window):
    rng = random.Random(window)
    rows = [[rng.randrange(5) for _ in range(rng.randint(1, 6))] for _ in range(40)]
    items = [(i, ids) for i, ids in enumerate(rows)]
    items[5] = items[17] = None  # error rows pass straight through
    consumed, out = [], []
    for it in admission_order(_tracked(items, consumed), order, window, key_ids=lambda it: it[1]):
        out.append(it)
        held = len(consumed) - len(out)
        assert 0 <= held < window  # the row being yielded has left the window
    assert sorted(out, key=lambda it: -1 if it is None else it[0]) == sorted(
        items, key=lambda it: -1 if it is None else it[0])
    if window >= len(items):
        kept = [it[1] for it in out if it is not None]
        assert kept == sorted(kept, key=len if order == "length" else None)


def test_prefix_order_puts_rows_sharing_a_prefix_together():
    rng = random.Random(0)
    prefixes = [[p] * 8 for p in (3, 1, 2)]
    rows = [(i, prefixes[i % 3] + [rng.randrange(100)]) for i in range(30)]
    rng.shuffle(rows)
    out = list(admission_order(iter(rows), "prefix", 64, key_ids=lambda it: it[1]))
    firsts = [ids[0] for _, ids in out]
    assert firsts == sorted(firsts)  # each prefix group is contiguous


def test_bad_order_and_window_are_refused():
    with pytest.raises(ValueError, match="order must be one of"):
        list(admission_order(iter([]), "random", 4, key_ids=len))
    with pytest.raises(ValueError, match="at least 1"):
        list(admission_order(iter([]), "length", 0, key_ids=len))


def test_results_are_identical_whatever_the_order(tmp_path, llama_dir):
    rng = random.Random(1)
    shared = "the same long opening words of every prompt in this group "
    rows = [{"prompt": (shared if i % 2 else "") + " ".join("w%d" % rng.randrange(50) for _ in range(rng.randint(1, 12)))}
            for i in range(16)]
    rows[7] = {"prompt": 5}  # a bad row stays an error row in every order
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    got = {}
    for order in ("input", "length", "prefix"):
        out = tmp_path / order
        r = run_cli(["--input", src, "--output", out, "--model", llama_dir, "--order", order, "--order-window", "5",
                     *FAST])
        assert r.exit_code == 0, r.output
        got[order] = sorted((row["index"], row["output"], row["finish_reason"], row["output_tokens"])
                            for row in results(out))
        assert [g[0] for g in got[order]] == list(range(16))
    assert got["input"] == got["length"] == got["prefix"]
    assert got["input"][7][2] == "error"
