"""95% bootstrap intervals over items (blocks, paragraphs, prompts, timed runs).

Every metric of the report is a statistic of per-item records (`STATISTICS` below): the value
shown is the statistic of all items, its interval the 2.5/97.5 percentiles of the statistic
over resamples of the items, and a retention interval resamples teacher and student items
with the same indices (paired: the same blocks / paragraphs / prompts).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

from eval.generation import distinct_n, repetition_rate

RESAMPLES = 1000
# Pooled statistics a repeated item would distort (a resampled duplicate continuation repeats
# all its n-grams and halves distinct-n): their resamples keep each drawn item once.
ONCE_PER_RESAMPLE = ("distinct_2", "distinct_3")


def _ratio_exp(items: Sequence[tuple[float, int]]) -> float:
    """exp(Σ nll / Σ tokens) of (nll_sum, tokens) records: a perplexity."""
    tokens = sum(n for _, n in items)
    return math.exp(min(sum(v for v, _ in items) / max(tokens, 1), 50.0))


def _ratio(items: Sequence[tuple[float, int]]) -> float:
    """Σ value / Σ count of (value_sum, count) records: a per-token mean."""
    return sum(v for v, _ in items) / max(sum(n for _, n in items), 1)


def _mean(items: Sequence[float]) -> float:
    return statistics.fmean(items) if items else 0.0


# metric -> (statistic of its item records, what one item is)
STATISTICS: dict[str, tuple[Callable, str]] = {
    "perplexity": (_ratio_exp, "blocks"),
    "top1_agreement": (_ratio, "blocks"),
    "kl_from_teacher": (_ratio, "blocks"),
    "coherence_probe": (_mean, "paragraphs"),
    "generation_teacher_ppl": (_ratio_exp, "prompts"),
    "distinct_2": (lambda items: distinct_n(list(items), 2), "prompts"),
    "distinct_3": (lambda items: distinct_n(list(items), 3), "prompts"),
    "repetition_rate": (lambda items: repetition_rate(list(items), 4), "prompts"),
    "similarity_to_teacher": (_mean, "prompts"),
    "similarity_to_reference": (_mean, "prompts"),
    "vqa_accuracy": (_mean, "questions"),
}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap(
    n: int, statistic: Callable[[list[int]], float | None], resamples: int = RESAMPLES, seed=0
) -> tuple[float | None, float | None]:
    """(low, high) 95% percentile interval of `statistic(indices)` over resampled indices."""
    if n < 2:
        return None, None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        value = statistic([rng.randrange(n) for _ in range(n)])
        if value is not None and math.isfinite(value):
            values.append(value)
    if not values:
        return None, None
    return percentile(values, 0.025), percentile(values, 0.975)


def metric_interval(metric: str, items: list) -> dict:
    """{value, n, unit, low, high} for one model's metric from its item records."""
    stat, unit = STATISTICS[metric]
    low, high = bootstrap(len(items), lambda idx: stat([items[i] for i in _draw(metric, idx)]))
    return {"value": stat(items), "n": len(items), "unit": unit, "low": low, "high": high}


def _draw(metric: str, idx: list[int]) -> list[int]:
    return sorted(set(idx)) if metric in ONCE_PER_RESAMPLE else idx


def retention_interval(metric: str, teacher_items: list, student_items: list, ratio) -> dict:
    """Paired bootstrap of retention = ratio(teacher statistic, student statistic)."""
    stat, unit = STATISTICS[metric]
    if len(teacher_items) != len(student_items):
        raise ValueError(f"{metric}: teacher and student were scored on different items")

    def paired(idx: list[int]) -> float | None:
        idx = _draw(metric, idx)
        return ratio(stat([teacher_items[i] for i in idx]), stat([student_items[i] for i in idx]))

    low, high = bootstrap(len(items := student_items), paired)
    return {
        "value": ratio(stat(teacher_items), stat(items)),
        "n": len(items),
        "unit": unit,
        "low": low,
        "high": high,
    }
