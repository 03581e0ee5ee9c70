"""The scheduler on its own (no model): token budget, decode-first order, memory reservation,
max_seqs, n > 1 deferral, priorities, and which blocks get published as prompt cache."""

from __future__ import annotations

import pytest

from serve.kv_cache import BlockPool
from serve.prefix_cache import block_keys
from serve.sampler import SamplingParams
from serve.scheduler import Request, Scheduler, Sequence, Status


def scheduler(num_blocks=32, block_size=4, budget=64, max_seqs=8, background=8) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, block_size), budget, max_seqs, background)


def add(sched: Scheduler, prompt, max_tokens=4, n=1, priority=0, rid="r", salt="") -> Request:
    """Queue a request the way Engine.add_request does."""
    req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, n=n), salt=salt)
    req.priority = priority
    for i in range(n):
        seq = Sequence(req, i, list(prompt), len(prompt) + max_tokens, None, None)
        req.seqs.append(seq)
        sched.waiting.append(seq)
    return req


def step(sched: Scheduler, token: int = 7) -> list[tuple[str, int, int, int]]:
    """One engine step without a model: schedule, commit, append a token to each sampling
    row, finish at max_len. Returns (request id, choice, start, count) per work item."""
    work = sched.schedule()
    sched.commit(work)
    for w in work:
        if w.samples:
            w.seq.tokens.append(token)
            if len(w.seq.tokens) >= w.seq.max_len:
                sched.finish(w.seq, "length")
    return [(w.seq.request.request_id, w.seq.index, w.start, w.count) for w in work]


def test_decodes_first_then_prefill_chunks_within_the_budget():
    sched = scheduler(budget=8)
    add(sched, range(3), max_tokens=8, rid="a")
    assert step(sched) == [("a", 0, 0, 3)]
    add(sched, range(100, 120), rid="b")
    assert step(sched) == [("a", 0, 3, 1), ("b", 0, 0, 7)]
    assert step(sched) == [("a", 0, 4, 1), ("b", 0, 7, 7)]
    assert step(sched) == [("a", 0, 5, 1), ("b", 0, 14, 6)]  # b's last chunk samples
    assert step(sched) == [("a", 0, 6, 1), ("b", 0, 20, 1)]


def test_a_prompt_longer_than_the_budget_spreads_over_steps_and_samples_once():
    sched = scheduler(budget=5)
    req = add(sched, range(12), max_tokens=1)
    assert [step(sched) for _ in range(3)] == [
        [("r", 0, 0, 5)], [("r", 0, 5, 5)], [("r", 0, 10, 2)],
    ]  # fmt: skip
    assert req.seqs[0].status is Status.FINISHED and req.seqs[0].tokens[-1] == 7
    assert sched.schedule() == [] and sched.pool.num_available() == 32


def test_max_seqs_caps_how_many_run_at_once():
    sched = scheduler(max_seqs=2)
    for rid in "abc":
        add(sched, range(3), max_tokens=2, rid=rid)
    assert [w[0] for w in step(sched)] == ["a", "b"]
    assert [s.request.request_id for s in sched.waiting] == ["c"]
    assert [w[0] for w in step(sched)] == ["a", "b"]  # both finish (max_tokens=2)
    assert [w[0] for w in step(sched)] == ["c"]


def test_admission_reserves_each_sequence_its_whole_lifetime():
    """6 blocks of 4: a (8 + 8 tokens = 4 blocks) and b (4 + 4 = 2 blocks) fit exactly, c
    waits — though only 3 blocks are in use after the first step — until one finishes."""
    sched = scheduler(num_blocks=6, block_size=4)
    a = add(sched, range(8), max_tokens=8, rid="a")
    b = add(sched, range(50, 54), max_tokens=4, rid="b")
    c = add(sched, range(60, 62), max_tokens=2, rid="c")
    assert [w[0] for w in step(sched)] == ["a", "b"]
    assert sched.pool.num_available() == 3 and c.seqs[0].status is Status.WAITING
    while b.seqs[0].status is not Status.FINISHED:
        assert "c" not in [w[0] for w in step(sched)]
    assert "c" in [w[0] for w in step(sched)]
    assert a.seqs[0].status is Status.RUNNING


def test_check_fits_accepts_an_exact_fit_and_names_the_numbers():
    sched = scheduler(num_blocks=6, block_size=8)
    sched.check_fits(40, 48)
    with pytest.raises(ValueError) as err:
        sched.check_fits(40, 49)
    assert str(err.value) == (
        "request needs 7 KV blocks (40 prompt + 9 max_tokens tokens) but the cache holds "
        "only 6 blocks of 8 tokens"
    )


def test_a_cached_prefix_is_reused_but_the_last_prompt_token_is_recomputed():
    sched = scheduler(num_blocks=16, block_size=4)
    first = add(sched, range(12), max_tokens=1, rid="first")
    step(sched)
    assert first.cached_tokens == 0 and first.created_blocks == {0, 1, 2}
    again = add(sched, range(12), max_tokens=1, rid="again")
    assert step(sched) == [("again", 0, 8, 4)]  # blocks 0 and 1 reused, block 2 recomputed
    assert again.cached_tokens == 8 and again.created_blocks == set()
    longer = add(sched, range(13), max_tokens=1, rid="longer")
    assert step(sched) == [("longer", 0, 12, 1)]
    assert longer.cached_tokens == 12
    other = add(sched, range(13), max_tokens=1, rid="other", salt="tenant-b")
    assert step(sched) == [("other", 0, 0, 13)] and other.cached_tokens == 0


def test_blocks_holding_generated_tokens_are_not_prompt_cache_creation():
    sched = scheduler(num_blocks=16, block_size=4)
    req = add(sched, range(6), max_tokens=8)
    while req.seqs[0].status is not Status.FINISHED:
        step(sched)
    assert req.created_blocks == {0}  # block 1 holds prompt tokens 4-5 and generated ones
    keys = block_keys(req.seqs[0].tokens, 4)
    assert len(keys) == 3
    assert len(sched.pool.lookup(keys)) == 3  # all full blocks published, generated ones too


def test_later_choices_wait_for_the_first_to_prefill_the_shared_prompt():
    sched = scheduler(num_blocks=16, block_size=4, budget=6)
    req = add(sched, range(10), max_tokens=3, n=3)
    assert step(sched) == [("r", 0, 0, 6)]
    assert step(sched) == [("r", 0, 6, 4)]  # choices 1 and 2 still wait: 2 tokens left over
    assert step(sched) == [("r", 0, 10, 1), ("r", 1, 8, 2), ("r", 2, 8, 2)]
    assert req.seqs[1].blocks[:2] == req.seqs[2].blocks[:2] == req.seqs[0].blocks[:2]
    assert req.cached_tokens == 0  # billed once, from the first choice


def test_a_paused_request_is_skipped_without_holding_up_later_ones():
    sched = scheduler()
    slow = add(sched, range(3), max_tokens=6, rid="slow")
    add(sched, range(3), max_tokens=6, rid="fast")
    slow.queue_size = 1
    step(sched)
    slow.outputs.put("unread")
    assert slow.paused
    assert [w[0] for w in step(sched)] == ["fast"]
    slow.outputs.get()
    assert [w[0] for w in step(sched)] == ["slow", "fast"]


def test_background_work_gets_only_its_allowance_while_interactive_work_exists():
    sched = scheduler(budget=16, background=3)
    add(sched, range(10), max_tokens=4, priority=1, rid="batch")
    add(sched, range(100, 110), max_tokens=4, priority=0, rid="chat")
    assert step(sched) == [("chat", 0, 0, 10), ("batch", 0, 0, 3)]
    assert step(sched) == [("chat", 0, 10, 1), ("batch", 0, 3, 3)]
    assert step(sched) == [("chat", 0, 11, 1), ("batch", 0, 6, 3)]
    assert step(sched) == [("chat", 0, 12, 1), ("batch", 0, 9, 1)]  # chat ends here
    assert step(sched) == [("batch", 0, 10, 1)]


def test_background_alone_or_equal_priorities_share_the_whole_budget():
    sched = scheduler(budget=16, background=3)
    add(sched, range(10), max_tokens=4, priority=1, rid="batch")
    assert step(sched) == [("batch", 0, 0, 10)]  # nothing more urgent: no cap
    add(sched, range(100, 110), max_tokens=4, priority=1, rid="batch2")
    assert step(sched) == [("batch", 0, 10, 1), ("batch2", 0, 0, 10)]


def test_background_waits_to_be_admitted_once_its_allowance_is_spent():
    sched = scheduler(budget=16, background=3)
    add(sched, range(4), max_tokens=4, priority=0, rid="chat")
    add(sched, range(10), max_tokens=4, priority=2, rid="b1")
    add(sched, range(20, 30), max_tokens=4, priority=1, rid="b2")
    assert step(sched) == [("chat", 0, 0, 4), ("b2", 0, 0, 3)]
    assert [s.request.request_id for s in sched.waiting] == ["b1"]


def test_spent_allowance_admits_no_new_background_request():
    """A running batch line uses the whole allowance: a new batch line waits (priority 1, the
    batch API's) instead of joining with zero tokens of work."""
    sched = scheduler(budget=16, background=3)
    add(sched, range(4), max_tokens=4, priority=0, rid="chat")
    add(sched, range(10), max_tokens=4, priority=1, rid="batch")
    assert step(sched) == [("chat", 0, 0, 4), ("batch", 0, 0, 3)]
    add(sched, range(20, 30), max_tokens=4, priority=1, rid="batch2")
    assert step(sched) == [("chat", 0, 4, 1), ("batch", 0, 3, 3)]
    assert [s.request.request_id for s in sched.waiting] == ["batch2"]


def test_a_sequence_holding_all_its_blocks_reserves_nothing_more():
    """4 blocks of 4: a (6 + 2 tokens) holds both its blocks after its prefill, so b (4 + 4
    tokens, 2 blocks) fits in the other two at once."""
    sched = scheduler(num_blocks=4, block_size=4)
    add(sched, range(6), max_tokens=2, rid="a")
    assert step(sched) == [("a", 0, 0, 6)]
    add(sched, range(50, 54), max_tokens=4, rid="b")
    assert step(sched) == [("a", 0, 6, 1), ("b", 0, 0, 4)]


def test_cached_blocks_a_request_reuses_count_once_against_memory():
    """Evictable cached blocks are both 'available' and the request's prefix hits: counted once,
    a request that needs more than the pool can still give waits instead of overcommitting."""
    sched = scheduler(num_blocks=8, block_size=4)
    add(sched, range(9), max_tokens=1, rid="warm")
    step(sched)  # caches 2 full prompt blocks, then finishes: they become evictable
    add(sched, range(50, 54), max_tokens=4, rid="other")  # 2 blocks over its life
    step(sched)
    big = add(sched, range(9), max_tokens=19, rid="big")  # 28 tokens = 7 blocks, 2 cached
    # 7 available (1 held by "other") - 2 reused - 1 still reserved by "other" = 4 < 5 needed
    assert [w[0] for w in step(sched)] == ["other"]
    assert big.seqs[0].status is Status.WAITING
    while sched.running:
        step(sched)
    assert step(sched) == [("big", 0, 8, 1)] and big.cached_tokens == 8


def test_images_are_part_of_the_prefix_lookup():
    from serve.prefix_cache import ImageSpan, image_digest

    sched = scheduler(num_blocks=16, block_size=4)
    cat = (ImageSpan(0, 4, image_digest(b"cat")),)
    first = add(sched, range(9), max_tokens=1, rid="cat")
    first.images = cat
    step(sched)
    dog = add(sched, range(9), max_tokens=1, rid="dog")
    dog.images = (ImageSpan(0, 4, image_digest(b"dog")),)
    assert step(sched) == [("dog", 0, 0, 9)]  # same tokens, another image: no reuse
    again = add(sched, range(9), max_tokens=1, rid="cat-again")
    again.images = cat
    assert step(sched) == [("cat-again", 0, 8, 1)]


def test_every_decode_gets_its_token_when_the_budget_is_exactly_enough():
    sched = scheduler(budget=3)
    for rid in "abc":
        add(sched, [1], max_tokens=4, rid=rid)
    assert step(sched) == [("a", 0, 0, 1), ("b", 0, 0, 1), ("c", 0, 0, 1)]
    assert step(sched) == [("a", 0, 1, 1), ("b", 0, 1, 1), ("c", 0, 1, 1)]


def test_admission_uses_the_budget_to_its_last_token_and_no_further():
    sched = scheduler(budget=5)
    add(sched, range(4), rid="a")
    add(sched, range(10, 16), rid="b")
    add(sched, range(20, 23), rid="c")
    assert step(sched) == [("a", 0, 0, 4), ("b", 0, 0, 1)]  # b starts with the last token
    assert [s.request.request_id for s in sched.waiting] == ["c"]  # budget spent: c waits


def test_an_interactive_request_is_admitted_while_a_batch_runs():
    sched = scheduler(budget=16, background=3)
    add(sched, range(20), max_tokens=4, priority=1, rid="batch")
    assert step(sched) == [("batch", 0, 0, 16)]
    add(sched, range(100, 105), max_tokens=4, priority=0, rid="chat")
    assert step(sched) == [("batch", 0, 16, 3), ("chat", 0, 0, 5)]


def test_scheduler_defaults_are_the_engines():
    import inspect

    from serve.engine import Engine

    engine = inspect.signature(Engine.__init__).parameters
    sched = Scheduler(BlockPool(4, 4))
    for name in ("max_tokens_per_step", "max_seqs", "background_tokens_per_step"):
        assert getattr(sched, name) == engine[name].default, name
