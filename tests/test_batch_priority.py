"""Scheduler priority: interactive requests (priority 0) run ahead of batch lines (priority 1),
and while an interactive request exists the batch gets only the background token allowance."""

from __future__ import annotations

import pytest

from distill.models.tiny import save_tiny_llama
from serve.engine import Engine
from serve.sampler import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BATCH = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=320, initializer_range=0.3)


def engine_for(model_dir, **kw) -> Engine:
    return Engine.from_pretrained(model_dir, num_blocks=256, block_size=8, **kw)


def test_interactive_admitted_before_earlier_batch_lines(model_dir):
    # One sequence at a time: whoever is admitted first runs to the end first.
    engine = engine_for(model_dir, max_seqs=1)
    batch = [engine.add_request([5 + i] * 10, GREEDY, priority=BATCH) for i in range(3)]
    interactive = engine.add_request([7] * 10, GREEDY)
    order = []
    while engine.has_work():
        for out in engine.step():
            if out.usage is not None:
                order.append(out.request_id)
    assert order[0] == interactive.request_id
    assert order[1:] == [r.request_id for r in batch]  # arrival order within a priority


def test_batch_gets_only_the_background_allowance_while_interactive_runs(model_dir):
    engine = engine_for(model_dir, max_tokens_per_step=64, background_tokens_per_step=4)
    batch = [engine.add_request([9 + i] * 12, GREEDY, priority=BATCH) for i in range(6)]
    interactive = engine.add_request([3] * 40, GREEDY)
    work = engine.scheduler.schedule()
    by_req = {}
    for w in work:
        by_req[w.seq.request.request_id] = by_req.get(w.seq.request.request_id, 0) + w.count
    assert by_req[interactive.request_id] == 40  # its whole prompt in the first step
    assert sum(by_req.get(r.request_id, 0) for r in batch) == 4
    engine.scheduler.commit(work)  # (no forward pass needed to check the allocation)

    # Alone, the batch gets its own allowance: steps stay short for whoever arrives next.
    alone = engine_for(model_dir, max_tokens_per_step=64, background_tokens_per_step=4,
                       batch_tokens_per_step=40)  # fmt: skip
    for i in range(6):
        alone.add_request([9 + i] * 12, GREEDY, priority=BATCH)
    assert sum(w.count for w in alone.scheduler.schedule()) == 40
    # An interactive request that arrives is admitted at the next step, ahead of the batch.
    late = alone.add_request([4] * 20, GREEDY)
    work = alone.scheduler.schedule()
    assert sum(w.count for w in work if w.seq.request is late) == 20
    assert sum(w.count for w in work if w.seq.request is not late) <= 4


def test_priorities_do_not_change_outputs(model_dir):
    # Greedy tokens are the same whether a prompt ran as a batch line or interactively.
    prompts = [[11 + i] * (5 + i) for i in range(4)]
    plain = engine_for(model_dir).generate(prompts, GREEDY)
    engine = engine_for(model_dir, background_tokens_per_step=2)
    reqs = [engine.add_request(p, GREEDY, priority=i % 2) for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    mixed = [engine.collect(r) for r in reqs]
    assert [c[0].token_ids for c in mixed] == [c[0].token_ids for c in plain]
