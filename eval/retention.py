"""Retention ratios: a student's metric relative to the teacher's, oriented so that 1.0 means
"as good as the teacher" and smaller means worse, whatever direction the metric runs in."""

from __future__ import annotations

import math
from collections.abc import Callable


def _higher_is_better(teacher: float, student: float) -> float | None:
    return student / teacher if teacher else None


def _lower_is_better(teacher: float, student: float) -> float | None:
    return teacher / student if student else None


def _divergence(teacher: float, student: float) -> float:
    # KL(teacher ‖ ·) is 0 for the teacher itself; exp(−KL) maps it to 1 and any gap below 1.
    return math.exp(-(student - teacher))


def _rate_is_bad(teacher: float, student: float) -> float | None:
    # A rate where 0 is best (repetition): compare the complements, 1 − rate.
    return (1 - student) / (1 - teacher) if teacher < 1 else None


# metric -> (how a student value becomes a retention ratio, what the metric means)
RETENTION: dict[str, tuple[Callable[[float, float], float | None], str]] = {
    "perplexity": (_lower_is_better, "held-out perplexity; retention = ppl_t / ppl_s"),
    "top1_agreement": (_higher_is_better, "top-1 next-token agreement with the teacher"),
    "kl_from_teacher": (_divergence, "mean KL(teacher ‖ model) nats/token; retention = exp(−KL)"),
    "coherence_probe": (_higher_is_better, "original order preferred over a shuffled copy"),
    "generation_teacher_ppl": (_lower_is_better, "teacher's perplexity of the continuations"),
    "distinct_2": (_higher_is_better, "unique / all bigrams of the continuations"),
    "distinct_3": (_higher_is_better, "unique / all trigrams of the continuations"),
    "repetition_rate": (
        _rate_is_bad,
        "repeated 4-grams within a continuation; retention on 1 − rate",
    ),
    "similarity_to_teacher": (_higher_is_better, "MiniLM cosine to the teacher's continuation"),
    "similarity_to_reference": (_higher_is_better, "MiniLM cosine to the real held-out text"),
    "vqa_accuracy": (_higher_is_better, "easy-VQA exact-match accuracy"),
}


def retention(teacher: dict[str, float], student: dict[str, float]) -> dict[str, float | None]:
    """Retention of every metric in RETENTION that both models report (None when undefined)."""
    out = {}
    for metric, (ratio, _) in RETENTION.items():
        if metric in teacher and metric in student:
            out[metric] = ratio(teacher[metric], student[metric])
    return out
