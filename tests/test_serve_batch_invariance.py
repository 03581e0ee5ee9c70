"""A sequence's numerics do not depend on its neighbours, its prompt's chunking or the cache.

On the real packaged teacher, fp32 and its PTQ int8 export: greedy tokens and their logprobs
(top 5 alternatives too) must be the same bits alone on a fresh engine, batched with 1–8 other
prompts, prefilled in chunks of several sizes, and with its prefix read from a warm cache.
"""

from __future__ import annotations

import pytest

from serve.engine import Completion, Engine
from serve.int8 import Int8Linear
from serve.loader import load_model
from serve.sampler import SamplingParams

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
OTHERS = [
    "Write a short poem about the sea.",
    "List three prime numbers greater than one hundred and explain why each is prime.",
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 1492, Columbus",
    "Translate to French: good morning, how are you today?",
    "Water boils at",
    "Once upon a time in a small village at the edge of a great forest, there lived",
]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def model(request, tmp_path_factory):
    from distill.assets import teacher_dir
    from distill.export import export
    from distill.quant import Int8Scheme

    if request.param == "fp32":
        return load_model(teacher_dir())
    out = tmp_path_factory.mktemp("teacher-int8") / "export"
    model = load_model(export(teacher_dir(), out, quant="int8", scheme=Int8Scheme(embeddings=True)))
    assert all(isinstance(layer.qkv, Int8Linear) and layer.qkv.is_fast for layer in model.layers)
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS], [tokenizer.encode(t) for t in OTHERS]


def engine(model, **kwargs) -> Engine:
    return Engine(model, num_blocks=256, block_size=8, **kwargs)


def fingerprint(c: Completion) -> tuple:
    return (c.token_ids, c.logprobs, c.top_logprobs)


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt on its own fresh engine: no neighbours, no cache, one prefill chunk."""
    return [fingerprint(engine(model).generate([p], PARAMS)[0][0]) for p in prompts[0]]


@pytest.mark.parametrize("others", [1, 3, 8])
def test_batched_with_others_equals_alone(model, prompts, alone, others):
    mine, theirs = prompts
    results = engine(model).generate(mine + theirs[:others], PARAMS)
    assert [fingerprint(r[0]) for r in results[:3]] == alone


@pytest.mark.parametrize("chunk", [3, 7, 16])
def test_chunked_prefill_equals_alone(model, prompts, alone, chunk):
    results = engine(model, max_tokens_per_step=chunk).generate(prompts[0], PARAMS)
    assert [fingerprint(r[0]) for r in results] == alone


def test_warm_prefix_cache_equals_alone(model, prompts, alone):
    e = engine(model)
    for p in prompts[0]:  # warm the cache with each prompt plus a different continuation
        e.generate([p + [42, 43, 44, 45, 46, 47, 48, 49]], PARAMS)
    results = [e.generate([p], PARAMS)[0][0] for p in prompts[0]]
    assert any(r.usage["cached_tokens"] > 0 for r in results)
    assert [fingerprint(r) for r in results] == alone
