"""Coherence probe: does a model give a paragraph's real sentence order a higher likelihood than a
sentence-shuffled copy of it?"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, sequences: list[list[int]], batch_size: int = 8
) -> list[float]:
    """Σ_{t≥1} log p(x_t | x_<t) for each token sequence (the first token is context only).

    Sequences are right-padded per batch: (B, L) ids with an attention mask; padded
    positions are masked out of the sum.
    """
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token_lp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        out.extend((token_lp * mask[:, 1:]).sum(-1).tolist())
    return out


def shuffled_copy(sentences: list[str], rng: random.Random, tries: int = 20) -> list[str]:
    """A permutation of `sentences` whose text differs from the original order."""
    original = " ".join(sentences)
    for _ in range(tries):
        perm = sentences[:]
        rng.shuffle(perm)
        if " ".join(perm) != original:
            return perm
    raise ValueError(f"cannot shuffle a paragraph whose sentences are all equal: {original[:80]}")


def probe_pairs(
    tokenizer, paragraphs: list[list[str]], seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """(original, shuffled) token sequences per paragraph, each starting with EOS as the document
    boundary training packs between documents, so every text token is scored."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    pairs = []
    for sentences in paragraphs:
        texts = (" ".join(sentences), " ".join(shuffled_copy(sentences, rng)))
        pairs.append(
            tuple([eos, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts)
        )
    return pairs


def coherence_probe(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8
) -> dict[str, float]:
    """Fraction of pairs where log p(original) > log p(shuffled) (ties count as failures),
    the mean log-likelihood margin in nats, and the per-paragraph margins."""
    if not pairs:
        raise ValueError("coherence probe needs at least one paragraph of 3+ sentences")
    flat = [seq for pair in pairs for seq in pair]
    scores = sequence_logprobs(model, flat, batch_size)
    margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(pairs))]
    return {
        "coherence_probe": sum(m > 0 for m in margins) / len(margins),
        "coherence_margin": sum(margins) / len(margins),
        "margins": margins,
    }
