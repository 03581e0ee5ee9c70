"""Generation quality: continuations of held-out prompts (fixed seed) and the statistics that
score them — the teacher's perplexity of the text, distinct-n and repetition rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from eval.probe import sequence_logprobs


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    prompts: list[list[int]],
    new_tokens: int,
    seed: int = 0,
    do_sample: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.95,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Exactly `new_tokens` new token ids per prompt.

    The length is fixed (EOS suppressed through min_new_tokens) so per-token statistics compare
    like with like; the sampler is re-seeded per prompt so teacher and student draw from the
    same random stream and a rerun reproduces the text.
    """
    device = next(model.parameters()).device
    out = []
    for i, ids in enumerate(prompts):
        torch.manual_seed(seed + i)
        input_ids = torch.tensor([ids], device=device)
        kwargs = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        out.append(generated[0, len(ids) :].tolist())
    return out


def scored_nll(
    scorer: nn.Module, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 8
) -> list[tuple[float, int]]:
    """Per prompt: (NLL that `scorer` assigns to the continuation given the prompt, its tokens)."""
    full = [p + c for p, c in zip(prompts, continuations, strict=True)]
    with_continuation = sequence_logprobs(scorer, full, batch_size)
    prompt_only = sequence_logprobs(scorer, [list(p) for p in prompts], batch_size)
    return [
        (-(a - b), len(c))
        for a, b, c in zip(with_continuation, prompt_only, continuations, strict=True)
    ]


def scored_perplexity(
    scorer: nn.Module, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 8
) -> float:
    """exp(mean NLL) that `scorer` assigns to the continuation tokens given their prompts."""
    items = scored_nll(scorer, prompts, continuations, batch_size)
    tokens = sum(n for _, n in items)
    return math.exp(min(sum(v for v, _ in items) / max(tokens, 1), 50.0))


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the samples (Li et al., 2016). Higher = more varied."""
    pooled = [g for s in samples for g in ngrams(s, n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def repetition_rate(samples: list[list[int]], n: int = 4) -> float:
    """Mean over samples of the fraction of n-grams that already occurred earlier in the same
    sample. 0 = never repeats itself; loops push it towards 1."""
    rates = []
    for s in samples:
        grams = ngrams(s, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0
