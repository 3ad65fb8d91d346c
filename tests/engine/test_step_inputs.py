"""A step's inputs, built with numpy in one staging buffer, say what the plan says."""
import random

import torch

from pagedbatch.engine.scheduler import SchedulerOutput
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.step_inputs import StepInputBuilder, unpack
from pagedbatch.sampling_params import SamplingParams


def _seq(i, n_tokens, computed, bs, rng):
    s = Sequence(str(i), [rng.randrange(1000) for _ in range(n_tokens)], SamplingParams(max_tokens=4), 0.0)
    s.num_computed_tokens = computed
    s.block_table = rng.sample(range(1000), -(-n_tokens // bs))
    return s


def test_mixed_prefill_chunks_and_decodes_match_a_plain_reference():
    rng, bs = random.Random(0), 16
    builder = StepInputBuilder(torch.device("cpu"), bs)
    for trial in range(20):
        seqs, news = [], []
        for i in range(rng.randint(1, 9)):
            n = rng.randint(1, 70)
            kind = rng.random()
            if kind < 0.4:  # decode
                c, q = n - 1, 1
            elif kind < 0.7 or n < 2:  # whole prefill, or the last chunk
                c = rng.randint(0, n - 1)
                q = n - c
            else:  # a middle chunk: nothing to sample
                c = rng.randint(0, n - 2)
                q = rng.randint(1, n - c - 1)
            seqs.append(_seq(i, n, c, bs, rng))
            news.append(q)
        got = builder.build(SchedulerOutput(seqs=seqs, num_new_tokens=news))
        ids, pos, slots, rows = [], [], [], []
        for i, (s, q) in enumerate(zip(seqs, news)):
            c = s.num_computed_tokens
            for p in range(c, c + q):
                ids.append(s.token_ids[p])
                pos.append(p)
                slots.append(s.block_table[p // bs] * bs + p % bs)
            if c + q == s.num_tokens:
                rows.append(i)
        m = got.meta
        assert got.input_ids.tolist() == ids and m.positions.tolist() == pos and m.slot_mapping.tolist() == slots
        assert got.sample_seqs == [seqs[i] for i in rows]
        qsl = [0]
        for q in news:
            qsl.append(qsl[-1] + q)
        assert m.query_start_loc.tolist() == qsl and m.query_start_loc.dtype == torch.int32
        assert got.logits_index.tolist() == [qsl[i + 1] - 1 for i in rows]
        assert m.seq_lens.tolist() == [s.num_computed_tokens + q for s, q in zip(seqs, news)]
        for i, s in enumerate(seqs):
            row = m.block_tables[i].tolist()
            assert row[: len(s.block_table)] == s.block_table and not any(row[len(s.block_table):])
        assert (m.num_seqs, m.num_tokens, m.max_query_len) == (len(seqs), len(ids), max(news))
        assert m.max_seq_len == max(s.num_computed_tokens + q for s, q in zip(seqs, news))


def test_forked_samples_reuse_their_parents_logits_row_and_copies_travel_in_the_buffer():
    rng, bs = random.Random(1), 16
    seqs = [_seq(0, 5, 4, bs, rng), _seq(1, 20, 0, bs, rng), _seq(2, 9, 8, bs, rng)]
    children = [Sequence("1", seqs[1].token_ids, SamplingParams(max_tokens=4), 0.0) for _ in range(2)]
    plan = SchedulerOutput(seqs=seqs, num_new_tokens=[1, 20, 1], forks=[(1, children[0]), (1, children[1])],
                           block_copies=[(7, 3), (7, 4)])
    got = StepInputBuilder(torch.device("cpu"), bs).build(plan)
    assert got.sample_seqs == seqs + children
    assert got.logits_index.tolist() == [0, 20, 21, 20, 20]  # the parent's last prompt token, once per fork
    assert got.copy_src.tolist() == [7, 7] and got.copy_dst.tolist() == [3, 4]
    assert len(got.header) == 8 and got.header[5] == 2
    unpacked = unpack(got.packed, got.header)  # what a tensor-parallel worker rebuilds
    assert unpacked.copy_dst.tolist() == [3, 4] and unpacked.logits_index.tolist() == [0, 20, 21, 20, 20]


def test_a_graph_steps_inputs_stay_int64_views_and_say_when_every_row_samples():
    rng, bs = random.Random(2), 16
    seqs = [_seq(i, rng.randint(2, 60), 0, bs, rng) for i in range(5)]
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    plan = SchedulerOutput(seqs=seqs, num_new_tokens=[1] * 5)
    want = StepInputBuilder(torch.device("cpu"), bs).build(plan)
    got = StepInputBuilder(torch.device("cpu"), bs).build(plan, int32=False)
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        a, b = getattr(want.meta, name), getattr(got.meta, name)
        assert a.dtype == torch.int32 and b.dtype == torch.int64 and torch.equal(a.long(), b), name
        assert b.untyped_storage().data_ptr() == got.packed.untyped_storage().data_ptr()  # a view, not a copy
    assert want.logits_all_rows and got.logits_all_rows and got.logits_index.tolist() == list(range(5))
    ips = got.ids_positions_slots()
    assert ips.tolist() == [got.input_ids.tolist(), got.meta.positions.tolist(), got.meta.slot_mapping.tolist()]
    assert not unpack(got.packed, got.header).logits_all_rows  # a worker gathers its rows as before

    # A row that does not sample (a one-token prefill chunk) or a fork: the rows are gathered.
    seqs[1].num_computed_tokens = seqs[1].num_tokens - 2
    assert not StepInputBuilder(torch.device("cpu"), bs).build(plan).logits_all_rows
    seqs[1].num_computed_tokens = seqs[1].num_tokens - 1
    child = Sequence("c", seqs[2].token_ids, SamplingParams(max_tokens=4), 0.0)
    forked = SchedulerOutput(seqs=seqs, num_new_tokens=[1] * 5, forks=[(2, child)])
    got = StepInputBuilder(torch.device("cpu"), bs).build(forked)
    assert not got.logits_all_rows and got.logits_index.tolist() == [0, 1, 2, 3, 4, 2]
