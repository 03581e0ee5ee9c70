"""The held-out text the evaluation reads: the training split's test documents, as paragraphs,
prompts and packed blocks."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from distill.data.corpus import Document, split_corpus
from distill.data.text import load_documents, pack_documents

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote.
# Hand-written: a regex is enough for Wikipedia lead paragraphs and needs no NLTK model download.
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass(frozen=True)
class Prompt:
    """A held-out document cut into a prompt and the text that really followed it."""

    key: str
    ids: list[int]  # prompt token ids
    text: str  # decoded prompt
    reference: str  # the document's own next `reference_tokens` tokens, decoded


def heldout_documents(
    source: str = "wiki",
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    hf: dict | None = None,
) -> list[Document]:
    """The test split of the corpus, by the same title hash training used (never trained on)."""
    docs = load_documents(source, **(hf or {}))
    return split_corpus(docs, validation_fraction, test_fraction)["test"]


def heldout_blocks(tokenizer, docs: list[Document], seq_len: int, max_blocks: int) -> torch.Tensor:
    """(num_blocks, seq_len) packed test blocks, exactly as training packs its test split."""
    return pack_documents(tokenizer, docs, seq_len, max_blocks)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_BOUNDARY.split(text.strip()) if s.strip()]


def probe_paragraphs(
    docs: list[Document],
    count: int,
    min_sentences: int = 3,
    max_chars: int = 700,
    seed: int = 0,
) -> list[list[str]]:
    """Up to `count` held-out paragraphs of at least `min_sentences` sentences, as sentence lists.

    Paragraphs longer than `max_chars` are left out to bound the probe's cost.
    """
    candidates = []
    for doc in sorted(docs, key=lambda d: d.key):
        sentences = split_sentences(doc.text)
        if len(sentences) >= min_sentences and len(doc.text) <= max_chars:
            candidates.append(sentences)
    rng = random.Random(seed)
    return rng.sample(candidates, min(count, len(candidates)))


def generation_prompts(
    tokenizer,
    docs: list[Document],
    count: int,
    prompt_tokens: int,
    reference_tokens: int,
    seed: int = 0,
) -> list[Prompt]:
    """`count` held-out documents long enough to give a prompt and a reference continuation."""
    rng = random.Random(seed)
    shuffled = sorted(docs, key=lambda d: d.key)
    rng.shuffle(shuffled)
    prompts = []
    for doc in shuffled:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens + reference_tokens:
            continue
        head, tail = ids[:prompt_tokens], ids[prompt_tokens : prompt_tokens + reference_tokens]
        prompts.append(Prompt(doc.key, head, tokenizer.decode(head), tokenizer.decode(tail)))
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(
            f"no held-out document has {prompt_tokens + reference_tokens} tokens for a prompt"
        )
    return prompts
