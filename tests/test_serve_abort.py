"""Abort ends every choice with a final "abort" output, frees its blocks, whatever the state."""

from __future__ import annotations

import threading

import pytest

from distill.models.tiny import save_tiny_llama
from serve.engine import Engine, StepOutput
from serve.sampler import SamplingParams
from serve.scheduler import Status

LONG = SamplingParams(max_tokens=40, temperature=1.0, seed=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=320, initializer_range=0.3)


def drain(req) -> list[StepOutput]:
    outs = []
    while not req.outputs.empty():
        outs.append(req.outputs.get_nowait())
    return outs


def assert_aborted(engine: Engine, req, total_blocks: int) -> list[StepOutput]:
    outs = drain(req)
    finals = [o for o in outs if o.finish_reason is not None]
    assert sorted(o.index for o in finals) == list(range(req.params.n))
    assert all(o.request_id == req.request_id for o in outs)  # the consumer can route them
    assert req.request_id not in engine.requests
    assert all(o.finish_reason == "abort" and o.token_id is None for o in finals)
    assert finals[-1].usage is not None and outs[-1] is finals[-1]  # usage on the last output
    assert finals[-1].usage["completion_tokens"] == sum(o.token_id is not None for o in outs)
    assert all(s.status is Status.FINISHED and not s.blocks for s in req.seqs)
    # Nothing left to run: stepping generates no further token for it.
    while engine.has_work():
        engine.step()
    assert req.outputs.empty()
    assert engine.pool.num_available() == total_blocks
    return outs


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("state", ["queued", "mid-prefill", "decoding"])
def test_abort_in_every_state_finishes_every_choice(model_dir, state, n):
    # Two sequences at most and 8 tokens a step: prompts of 30 prefill over several steps.
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8, max_tokens_per_step=8)
    total = engine.pool.num_available()
    params = SamplingParams(**{**LONG.__dict__, "n": n})
    blocker = engine.add_request(list(range(1, 31)), LONG)  # ahead in the queue
    req = engine.add_request(list(range(40, 70)), params)
    if state == "queued":
        engine.step()
        assert all(s.status is Status.WAITING for s in req.seqs)
    elif state == "mid-prefill":
        while req.seqs[0].num_computed == 0:
            engine.step()
        assert 0 < req.seqs[0].num_computed < 30
    else:
        while not any(o.token_id is not None for o in list(req.outputs.queue)):
            engine.step()
    assert engine.abort(req.request_id)
    engine.abort(blocker.request_id)
    outs = assert_aborted(engine, req, total)
    if state != "decoding":
        assert all(o.token_id is None for o in outs)
    assert not engine.abort(req.request_id)


def test_abort_wakes_a_consumer_blocked_on_the_queue(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    req = engine.add_request([1, 2, 3], LONG)
    got: list[StepOutput] = []
    consumer = threading.Thread(target=lambda: got.append(req.outputs.get(timeout=30)))
    consumer.start()  # queued, nothing generated: the consumer waits on an empty queue
    assert engine.abort(req.request_id)
    consumer.join(timeout=30)
    assert not consumer.is_alive() and got[0].finish_reason == "abort"


def test_abort_of_a_paused_request_with_a_full_queue_still_delivers(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    total = engine.pool.num_available()
    req = engine.add_request([1, 2, 3], SamplingParams(**{**LONG.__dict__, "n": 2}), queue_size=2)
    for _ in range(5):
        engine.step()
    assert req.paused and req.outputs.qsize() == 2  # the reader has left 2 outputs unread
    assert engine.abort(req.request_id)
    outs = assert_aborted(engine, req, total)
    assert len(outs) == 4 and outs[-1].usage["completion_tokens"] == 2
