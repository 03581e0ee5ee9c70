"""Sampling filters and stop strings with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch

from serve.detokenizer import TextStream
from serve.engine import Engine
from serve.sampler import SamplingParams, apply_penalties, filter_logits, sample


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]


def test_seeded_sample_matches_itself_and_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.8, seed=1)] * 2 + [SamplingParams(temperature=0)]

    def draw(seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(2)] + [None]
        return [c.token_id for c in sample(logits, params, gens, [None] * 3)]

    assert draw(5) == draw(5)
    assert draw(5)[2] == int(logits[2].argmax())


def test_text_stream_never_streams_a_stop_string(tokenizer):
    text = "The capital of France is Paris. The capital of Spain is Madrid. 🙂 café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=("Spain is",))
    out, hit = "", False
    for t in ids:
        delta, hit = stream.add(t)
        out += delta
        assert "Spain is" not in out
        if hit:
            break
    assert hit and out == "The capital of France is Paris. The capital of "
    plain = TextStream(tokenizer)
    assert "".join(plain.add(t)[0] for t in ids) + plain.flush() == text


def test_engine_stop_string(tiny_teacher_dir):
    engine = Engine.from_pretrained(tiny_teacher_dir, num_blocks=32, block_size=16)
    prompt = engine.tokenizer.encode("Once upon a time").ids
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    (free,) = engine.generate([prompt], params)[0]
    assert free.finish_reason == "length" and len(free.text) > 6
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    (stopped,) = engine.generate([prompt], SamplingParams(**{**vars(params), "stop": (stop,)}))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_temperature_shapes_the_distribution():
    """Empirical P(token 0) follows softmax(logits / T): ~0.87 at T=0.5, ~0.41 at T=2
    (ignoring T would give 0.64 for both)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 3000
    for temperature in (0.5, 2.0):
        params = [SamplingParams(temperature=temperature)] * draws
        gen = torch.Generator().manual_seed(0)
        rows = logits.expand(draws, -1)
        picks = [c.token_id for c in sample(rows, params, [gen] * draws, [None] * draws)]
        counts = torch.bincount(torch.tensor(picks), minlength=4).float() / draws
        expected = (logits / temperature).softmax(-1)
        # 3000 draws: the standard error of each frequency is below 0.01
        assert torch.allclose(counts, expected, atol=0.03), (temperature, counts, expected)


def test_penalties_follow_openai_formula():
    row = torch.zeros(6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(row, [2, 2, 2, 5], params)
    assert row.tolist() == [0, 0, -(0.5 + 3 * 0.25), 0, 0, -(0.5 + 0.25)]


def test_penalties_change_the_greedy_pick():
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.9, 0.0]])
    generated = [[1, 1, 3]]

    def pick(**kw) -> int:
        params = [SamplingParams(temperature=0, **kw)]
        return sample(logits, params, [None], [None], generated)[0].token_id

    assert pick() == 1
    assert pick(presence_penalty=0.6) == 2  # 1 → 0.4, 3 → 0.3
    assert pick(frequency_penalty=0.3) == 3  # 1 → 0.4 (twice), 3 → 0.6
    assert pick(frequency_penalty=-2.0) == 1  # negative values encourage repetition
    # without `generated` (the old call) no penalty applies
    params = [SamplingParams(temperature=0, presence_penalty=2.0)]
    assert sample(logits, params, [None], [None])[0].token_id == 1


def test_penalties_keep_reported_logprobs_and_leave_other_rows_alone():
    logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0, logprobs=True),
        SamplingParams(temperature=0, logprobs=True),
    ]
    a, b = sample(logits, params, [None, None], [None, None], [[0, 0], [0, 0]])
    assert a.token_id != 0 and b.token_id == 0
    raw = torch.log_softmax(logits[0], -1)
    assert a.logprob == pytest.approx(float(raw[a.token_id]))  # the model's own distribution
    assert logits[0, 0] == 3.0  # the caller's logits are not modified


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [-2.01, 2.5])
def test_penalty_range(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    SamplingParams(**{field: 2.0})
    SamplingParams(**{field: -2.0})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n must"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"stop": ("ok", "")}, "stop must"),
        ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
        ({"stop_token_ids": (1.0,)}, "stop_token_ids"),
    ],
)
def test_sampling_params_reject_out_of_range_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_accept_the_edges_of_each_range():
    edges = SamplingParams(
        max_tokens=1, temperature=0, top_p=1.0, top_k=0, n=1, top_logprobs=20,
        stop="end", stop_token_ids=[0],
    )  # fmt: skip
    assert edges.stop == ("end",) and edges.stop_token_ids == (0,)  # a str and a list normalised
    assert edges.greedy and not edges.penalized
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_p=1e-6).top_p == 1e-6
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(frequency_penalty=-0.5).penalized


def test_top_p_one_and_top_k_vocab_are_off():
    """top_p = 1 masks nothing, not even a token whose probability rounds away in fp32
    (cumsum reaches 1.0 before it); top_k ≥ V masks nothing either."""
    logits = torch.tensor([0.0, -30.0, -40.0])
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=1.0))).all()
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_k=3))).all()
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_k=7))).all()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=1))).tolist()
    assert kept == [True, False, False]
    # temperature divides the logits that the filters (and then softmax) see
    out = filter_logits(torch.tensor([2.0, -1.0]), SamplingParams(temperature=0.5))
    assert out.tolist() == [4.0, -2.0]


def test_top_p_drops_a_token_once_the_ones_before_it_reach_top_p_exactly():
    """Four equal tokens (0.25 each, exact in fp32): top_p = 0.5 keeps two — the third token's
    predecessors already hold 0.5 — and top_p = 0.51 keeps three."""
    logits = torch.zeros(4)
    assert int(torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.5))).sum()) == 2
    assert int(torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.51))).sum()) == 3


def test_logprobs_and_top_logprobs_per_row():
    """Each row reports its own chosen-token logprob and exactly its own number of top
    alternatives (log_softmax of the raw logits, best first); rows that did not ask get none."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.5, 4.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0, logprobs=True),
        SamplingParams(temperature=0),
    ]
    a, b, c = sample(logits, params, [None] * 3, [None] * 3)
    logp = torch.log_softmax(logits, -1)
    assert (a.token_id, b.token_id, c.token_id) == (1, 2, 0)
    assert a.logprob == pytest.approx(float(logp[0, 1]))
    assert b.logprob == pytest.approx(float(logp[1, 2]))
    assert [t for t, _ in a.top] == [1, 2, 0]
    assert [v for _, v in a.top] == pytest.approx(logp[0, [1, 2, 0]].tolist())
    assert b.top == [] and c.logprob is None and c.top == []
    only_top = sample(logits[:1], [SamplingParams(temperature=0, top_logprobs=2)], [None], [None])
    assert [t for t, _ in only_top[0].top] == [1, 2]
    assert only_top[0].logprob == pytest.approx(float(logp[0, 1]))


def test_masks_apply_to_their_own_row_only():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    allow = torch.tensor([True, False, True])
    params = [SamplingParams(temperature=0)] * 2
    masked, free = sample(logits, params, [None, None], [allow, None])
    assert (masked.token_id, free.token_id) == (2, 1)
    # a sampled (temperature > 0) row never draws a masked token
    hot = [SamplingParams(temperature=5.0)] * 200
    rows = logits[:1].expand(200, -1)
    gen = torch.Generator().manual_seed(0)
    picks = {c.token_id for c in sample(rows, hot, [gen] * 200, [allow] * 200)}
    assert picks == {0, 2}
