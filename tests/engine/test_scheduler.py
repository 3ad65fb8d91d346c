"""Scheduler and block manager, driven without a model (ints only)."""
import random

import pytest

from pagedbatch.config import EngineConfig
from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.scheduler import Scheduler
from pagedbatch.engine.sequence import Sequence, SequenceStatus
from pagedbatch.sampling_params import SamplingParams


def make(policy="fcfs", blocks=64, block_size=16, budget=64, max_seqs=8, skip=8, cache=False):
    cfg = EngineConfig(model="unused", block_size=block_size, scheduling_policy=policy, max_num_batched_tokens=budget,
                       max_num_seqs=max_seqs, sjf_max_skipped_steps=skip, enable_prefix_caching=cache)
    bm = BlockManager(blocks, block_size, enable_prefix_caching=cache)
    return Scheduler(cfg, bm), bm


def seq(i, prompt_len, max_tokens, t=None, prompt=None):
    prompt = prompt if prompt is not None else list(range(1, prompt_len + 1))
    return Sequence(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                    arrival=float(i if t is None else t))


def run_fake(sched, bm, seqs, max_steps=100_000, check=None):
    """Drive the scheduler like the engine does, with a fake model emitting token 7."""
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        assert not plan.is_empty(), "no progress"
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert len({id(s) for s in plan.seqs}) == len(plan.seqs)
        for s, n in zip(plan.seqs, plan.num_new_tokens):
            assert s.status is SequenceStatus.RUNNING
            assert len(s.block_table) * bm.block_size >= s.num_computed_tokens + n
        if check:
            check(plan)
        sched.advance(plan)
        sched.cache_blocks(plan)
        for s, n in zip(plan.seqs, plan.num_new_tokens):
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
                if s.num_output_tokens >= s.params.max_tokens:
                    sched.finish(s)
        # Invariant: reference counts equal the number of tables holding each block.
        holders = [0] * bm.num_blocks
        for s in sched.running:
            for b in s.block_table:
                holders[b] += 1
        assert holders == bm.ref_counts
        assert bm.num_free_blocks + sum(1 for c in bm.ref_counts if c) == bm.num_blocks
        steps += 1
        assert steps < max_steps
    return steps


def test_all_blocks_free_after_run():
    sched, bm = make()
    seqs = [seq(i, 10 + 7 * i, 20) for i in range(10)]
    run_fake(sched, bm, seqs)
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)
    assert all(s.num_output_tokens == 20 for s in seqs)


def test_chunked_prefill_splits_long_prompt_under_token_budget():
    sched, bm = make(budget=16)
    s = seq(0, 50, 3)
    chunks = []
    run_fake(sched, bm, [s], check=lambda plan: chunks.append(plan.num_new_tokens[0]))
    assert chunks[:4] == [16, 16, 16, 2] and chunks[4:] == [1, 1]


@pytest.mark.parametrize("policy", ["fcfs", "sjf-align"])
@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("cache", [False, True])
def test_randomized_tiny_cache_never_leaks_and_always_finishes(policy, trial, cache):
    rng = random.Random(trial)
    block_size = rng.choice([16, 32])
    blocks = rng.randint(8, 20)
    sched, bm = make(policy, blocks=blocks, block_size=block_size, budget=rng.choice([8, 32, 100]),
                     max_seqs=rng.randint(1, 12), skip=rng.randint(0, 4), cache=cache)
    cap = blocks * block_size
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(0, cap // 3))] for _ in range(3)]
    seqs = []
    for i in range(40):
        p = rng.randint(1, cap // 2)
        prompt = (rng.choice(prefixes) + [rng.randrange(1000) for _ in range(p)])[:p]
        seqs.append(seq(i, p, rng.randint(1, cap - p), prompt=prompt))
    run_fake(sched, bm, seqs)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert bm.num_free_blocks == blocks and all(c == 0 for c in bm.ref_counts)


def test_preemption_recomputes_newest_sequence():
    # 4 blocks of 16: two sequences growing to 32 tokens each cannot both fit.
    sched, bm = make(blocks=4, budget=64)
    a, b = seq(0, 20, 30), seq(1, 20, 30)
    run_fake(sched, bm, [a, b])
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert sched.stats.preemptions == b.num_preemptions


def test_sjf_align_advances_shortest_lengths_together():
    sched, bm = make("sjf-align", blocks=64, budget=256, skip=100)
    lens = [50, 52, 55]
    seqs = [seq(i, n, 10) for i, n in enumerate(lens)]
    decode_lengths = []

    def check(plan):
        ls = [s.num_tokens for s, n in zip(plan.seqs, plan.num_new_tokens) if n == 1]
        if ls:
            decode_lengths.append(sorted(ls))

    run_fake(sched, bm, seqs, check=check)
    # 50 advances alone until it meets 52, those two advance together until they meet 55.
    assert decode_lengths[0] == [51]  # after prefill 50 -> 51 tokens
    assert all(len(set(ls)) == 1 for ls in decode_lengths)
    assert any(len(ls) == 3 for ls in decode_lengths)  # all three meet once 50 has caught up
    assert sched.stats.padding_free_decode_steps == sched.stats.decode_steps


def test_sjf_align_starvation_bound_schedules_long_sequence():
    sched, bm = make("sjf-align", blocks=64, budget=256, skip=2)
    short = [seq(i, 10, 40) for i in range(3)]
    long = seq(9, 100, 5)
    waits = []
    gap = [0]

    def check(plan):
        if any(s is long and n == 1 for s, n in zip(plan.seqs, plan.num_new_tokens)):
            waits.append(gap[0])
            gap[0] = 0
        else:
            gap[0] += 1

    run_fake(sched, bm, short + [long], check=check)
    assert long.num_output_tokens == 5
    assert max(waits) <= 3


def test_prefix_cache_reuses_full_blocks_and_leaves_one_token_to_compute():
    sched, bm = make(blocks=32, cache=True, budget=1000)
    shared = list(range(100, 148))  # three full blocks of 16
    a = seq(0, 0, 2, prompt=shared + [1, 2, 3])
    run_fake(sched, bm, [a])
    b = seq(1, 0, 2, prompt=shared + [4, 5])
    c = seq(2, 0, 2, prompt=list(shared))  # entirely cached: the last block is recomputed
    first_chunks = {}
    run_fake(sched, bm, [b, c], check=lambda plan: [first_chunks.setdefault(s.request_id, n)
                                                   for s, n in zip(plan.seqs, plan.num_new_tokens)])
    assert first_chunks["r1"] == 2  # 48 cached tokens, 2 computed
    assert first_chunks["r2"] == 16  # 32 cached, the last full block recomputed for its logits
    assert bm.hit_tokens == 48 + 32 and bm.queried_tokens == 51 + 50 + 48
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_evicts_least_recently_freed_blocks_first():
    sched, bm = make(blocks=6, cache=True, budget=1000)
    p1, p2 = list(range(1, 33)), list(range(200, 232))  # two blocks each
    run_fake(sched, bm, [seq(0, 0, 1, prompt=p1 + [7])])
    run_fake(sched, bm, [seq(1, 0, 1, prompt=p2 + [7])])
    # Filling four fresh blocks must evict p1's blocks (freed earlier) before p2's.
    run_fake(sched, bm, [seq(2, 0, 1, prompt=list(range(500, 563)))])
    hit = seq(3, 0, 1, prompt=p2 + [9])
    run_fake(sched, bm, [hit])
    miss = seq(4, 0, 1, prompt=p1 + [9])
    before = bm.hit_tokens
    run_fake(sched, bm, [miss])
    assert bm.hit_tokens == before  # p1 was evicted
    assert bm.hit_tokens >= 32  # p2 survived


def test_rows_sharing_a_prefix_admitted_together_compute_it_once():
    # Three rows share a 64-token prefix and arrive together: the first computes it, the other two
    # wait one step and take its four blocks from the cache instead of computing them again.
    sched, bm = make(blocks=64, cache=True, budget=1000)
    shared = list(range(100, 164))
    rows = [seq(i, 0, 2, prompt=shared + [1 + i, 2, 3]) for i in range(3)] + [seq(3, 0, 2, prompt=list(range(9, 30)))]
    admitted = []
    run_fake(sched, bm, rows, check=lambda plan: admitted.append(
        sorted(s.request_id for s, n in zip(plan.seqs, plan.num_new_tokens) if n > 1)))
    assert admitted[0] == ["r0", "r3"]  # an unrelated row is not held up
    assert admitted[1] == ["r1", "r2"]
    assert bm.hit_tokens == 2 * 64
    assert bm.num_free_blocks == bm.num_blocks and not bm._computing


def test_a_row_waiting_for_a_prefix_goes_ahead_when_its_owner_is_aborted():
    sched, bm = make(blocks=64, cache=True, budget=16)  # the owner needs 4 steps for its prefix
    shared = list(range(100, 164))
    owner, follower = seq(0, 0, 1, prompt=shared + [1]), seq(1, 0, 1, prompt=shared + [2])
    sched.add(owner)
    sched.add(follower)
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["r0"]  # r1 waits for r0's blocks
    sched.advance(plan)
    sched.cache_blocks(plan)
    sched.finish(owner)  # aborted: its unfinished blocks are no longer being computed
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["r1"]
    assert bm.hit_tokens == 16  # the one block r0 finished is reused; r1 computes the rest itself


def test_a_row_waits_only_for_blocks_it_shares():
    sched, bm = make(blocks=64, cache=True, budget=1000)
    a = seq(0, 0, 1, prompt=list(range(100, 164)) + [1])
    b = seq(1, 0, 1, prompt=list(range(100, 110)) + [5] * 30)  # shares less than one block with a
    sched.add(a)
    sched.add(b)
    assert [s.request_id for s in sched.schedule().seqs] == ["r0", "r1"]


# -- n samples: forks, shared blocks, copy-on-write ---------------------------


def forked(i, prompt, max_tokens, n, t=None):
    return Sequence(f"r{i}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, n=n),
                    arrival=float(i if t is None else t))


def run_fake_kv(sched, bm, seqs, on_plan=None):
    """run_fake for requests with forks, over a fake KV cache that stores token ids.

    Every sample gets its own tokens (so copy-on-write matters), and before
    each step's "forward" every token the planned rows attend to must be in
    the cache at the slot their block tables name. Returns all samples.
    """
    bs = bm.block_size
    kv = [[None] * bs for _ in range(bm.num_blocks)]
    samples = list(seqs)
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        assert not plan.is_empty(), "no progress"
        assert len(sched.running) + sched._reserved <= sched.config.max_num_seqs
        if on_plan:
            on_plan(plan)
        snapshot = {src: list(kv[src]) for src, _ in plan.block_copies}
        assert len({dst for _, dst in plan.block_copies}) == len(plan.block_copies)
        for src, dst in plan.block_copies:
            kv[dst] = list(snapshot[src])
        for s, n in zip(plan.seqs, plan.num_new_tokens):
            c = s.num_computed_tokens
            for p in range(c, c + n):
                kv[s.block_table[p // bs]][p % bs] = s.token_ids[p]
        for s, n in zip(plan.seqs, plan.num_new_tokens):
            upto = s.num_computed_tokens + n
            assert [kv[s.block_table[p // bs]][p % bs] for p in range(upto)] == s.token_ids[:upto], s
        for i, child in plan.forks:
            parent = plan.seqs[i]
            assert child.block_table == parent.block_table and child.num_computed_tokens == parent.num_tokens
            samples.append(child)
        sched.advance(plan)
        sched.cache_blocks(plan)
        for s in [s for s, _ in zip(plan.seqs, plan.num_new_tokens)] + [c for _, c in plan.forks]:
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(hash((s.request_id, s.sample_index, s.num_tokens)) % 1000)
                if s.num_output_tokens >= s.params.max_tokens:
                    sched.finish(s)
        holders = [0] * bm.num_blocks
        for s in sched.running:
            for b in s.block_table:
                holders[b] += 1
        assert holders == bm.ref_counts
        steps += 1
        assert steps < 100_000
    return samples


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("prompt_len", [40, 48])
def test_forks_share_the_prompt_blocks_and_copy_only_a_partly_filled_last_block(cache, prompt_len):
    sched, bm = make(blocks=32, budget=1000, cache=cache)
    parent = forked(0, range(1, prompt_len + 1), 3, n=4)
    plans = []
    samples = run_fake_kv(sched, bm, [parent], on_plan=lambda plan: plans.append((plan, list(parent.block_table))))
    (first, table), (second, _) = plans[0], plans[1]
    assert first.seqs == [parent] and first.num_new_tokens == [prompt_len]  # the prompt, once
    assert [(i, c.sample_index) for i, c in first.forks] == [(0, 1), (0, 2), (0, 3)]
    assert sched.stats.prefill_tokens == prompt_len and sched.stats.forked_seqs == 3
    if prompt_len % 16:
        # The partly filled last block is copied for three of the four writers; the last writes in place.
        assert [src for src, _ in second.block_copies] == [table[-1]] * 3 and bm.num_cow_copies == 3
    else:
        assert second.block_copies == [] and bm.num_cow_copies == 0
    assert len(samples) == 4 and all(s.num_output_tokens == 3 for s in samples)
    assert bm.num_free_blocks == bm.num_blocks


def test_fork_takes_a_reference_to_every_block_and_copy_on_write_drops_it():
    sched, bm = make(blocks=16, budget=1000)
    parent = forked(0, range(1, 41), 5, n=3)  # 40 tokens: two full blocks and 8 tokens in a third
    sched.add(parent)
    plan = sched.schedule()
    children = [c for _, c in plan.forks]
    table = list(parent.block_table)
    assert len(table) == 3 and all(c.block_table == table for c in children)
    assert [bm.ref_counts[b] for b in table] == [3, 3, 3]
    sched.advance(plan)
    for s in [parent] + children:
        s.token_ids.append(7 + s.sample_index)
    plan = sched.schedule()
    assert plan.seqs == [parent] + children and plan.num_new_tokens == [1, 1, 1]
    # The first two writers copy the shared last block; the last one (now its only holder) writes in place.
    assert plan.block_copies == [(table[2], parent.block_table[2]), (table[2], children[0].block_table[2])]
    assert children[1].block_table == table
    assert [bm.ref_counts[b] for b in table] == [3, 3, 1]
    assert len({s.block_table[2] for s in [parent] + children}) == 3
    for s in [parent] + children:
        sched.finish(s)
    assert bm.num_free_blocks == bm.num_blocks


def test_a_request_is_admitted_only_when_all_its_samples_fit_in_max_num_seqs():
    sched, bm = make(blocks=64, budget=1000, max_seqs=4)
    a, b, c = seq(0, 10, 3), forked(1, range(1, 20), 3, n=4), seq(2, 10, 3)
    plans = []
    samples = run_fake_kv(sched, bm, [a, b, c], on_plan=lambda plan: plans.append({s.request_id for s in plan.seqs}))
    # b needs four places while a holds one; c does not jump the queue meanwhile, and waits for b's samples.
    assert plans[0] == {"r0"}
    first = {rid: min(i for i, p in enumerate(plans) if rid in p) for rid in ("r1", "r2")}
    last_a = max(i for i, p in enumerate(plans) if "r0" in p)
    last_b = max(i for i, p in enumerate(plans) if "r1" in p)
    assert last_a < first["r1"] and last_b < first["r2"]
    assert len(samples) == 6 and all(s.num_output_tokens == 3 for s in samples)


def test_a_prompt_chunked_over_several_steps_holds_places_for_its_samples():
    sched, bm = make(blocks=64, budget=16, max_seqs=4)
    parent = forked(0, range(1, 50), 2, n=3)
    others = [seq(i, 4, 30) for i in range(1, 4)]
    seen = []
    run_fake_kv(sched, bm, [parent] + others, on_plan=lambda plan: seen.append(len(sched.running)))
    assert max(seen) <= 4
    assert sched.stats.forked_seqs == 2 and bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("trial", range(8))
@pytest.mark.parametrize("cache", [False, True])
def test_randomized_forks_never_leak_and_every_read_sees_its_own_tokens(trial, cache):
    rng = random.Random(100 + trial)
    block_size = 16
    blocks = rng.randint(10, 24)
    sched, bm = make(rng.choice(["fcfs", "sjf-align"]), blocks=blocks, block_size=block_size,
                     budget=rng.choice([8, 32, 100]), max_seqs=rng.randint(4, 10), skip=rng.randint(0, 4),
                     cache=cache)
    cap = blocks * block_size
    prefix = [rng.randrange(1000) for _ in range(rng.randint(0, cap // 4))]
    seqs = []
    for i in range(16):
        p = rng.randint(1, cap // 3)
        prompt = ((prefix if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(p)])[:p]
        n = rng.choice([1, 1, 2, 3, 4])
        seqs.append(forked(i, prompt, rng.randint(1, (cap - p) // 2), n=n))
    samples = run_fake_kv(sched, bm, seqs)
    assert len(samples) == sum(s.params.n for s in seqs)
    assert all(s.num_output_tokens == s.params.max_tokens for s in samples)
    assert bm.num_free_blocks == blocks and all(c == 0 for c in bm.ref_counts)
    assert sched.stats.forked_seqs == sum(s.params.n - 1 for s in seqs)
    if trial == 0:
        assert sched.stats.preemptions > 0, "the test meant to force preemption"
