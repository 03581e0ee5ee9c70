"""Sampling filters and stop strings with the real SmolLM2 tokenizer."""

from __future__ import annotations

import torch

from serve.detokenizer import TextStream
from serve.engine import Engine
from serve.sampler import SamplingParams, filter_logits, sample


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
