"""Parameter-budget search: enumerate student shapes, keep those near the budget, pick one.

The budget is a cap: candidates are shapes with (1 − tolerance)·budget ≤ parameters ≤ budget,
above the width floors and accepted by the family's config validation. Rule (Minitron,
Muralidharan et al. 2024: at equal size, width pruning beats depth pruning): take the one that
keeps the most layers, then the most importance retained (product over layers, channels,
neurons and heads of the fraction of total importance kept), then the closest to the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from distill.prune.plan import Dims, head_dim_of, make_plan, retained_importance
from distill.prune.slicing import config_problem, parameters_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """Which shapes the budget search may consider (fractions are of the teacher's dims)."""

    tolerance: float = 0.03
    hidden_step: int = 8  # hidden candidates: multiples of this the family's config accepts
    intermediate_step: int = 64
    min_hidden_fraction: float = 0.75
    min_intermediate_fraction: float = 0.5
    min_layers_fraction: float = 0.5
    prune_heads: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"student.search.tolerance={self.tolerance} must be in [0, 1)")
        if self.hidden_step < 1 or self.intermediate_step < 1:
            raise ValueError("student.search.hidden_step and intermediate_step must be >= 1")
        floors = (
            self.min_hidden_fraction,
            self.min_intermediate_fraction,
            self.min_layers_fraction,
        )
        if not all(0 <= f <= 1 for f in floors):
            raise ValueError(f"student.search.min_*_fraction must be in [0, 1], got {floors}")

    @classmethod
    def from_dict(cls, values: dict) -> SearchSpace:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown student.search keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class Candidate:
    dims: Dims
    parameters: int
    fraction: float  # of the teacher's parameters
    retained: float  # product of per-axis retained importance fractions
    in_window: bool = True  # within the budget window

    def rank_key(self, target: float) -> tuple:
        return (-self.dims.num_hidden_layers, -self.retained, abs(self.fraction - target))


def _widths(full: int, floor_fraction: float, step: int) -> list[int]:
    """Multiples of `step` from floor_fraction·full up to full, plus full itself."""
    low = max(1, math.ceil(floor_fraction * full))
    values = {w for w in range(step, full + 1, step) if w >= low}
    return sorted(values | {full})


def _head_pairs(teacher: Dims, prune_heads: bool) -> list[tuple[int, int]]:
    if not prune_heads:
        return [(teacher.num_attention_heads, teacher.num_key_value_heads)]
    return [
        (kv * group, kv)
        for kv in range(1, teacher.num_key_value_heads + 1)
        for group in range(1, teacher.group_size + 1)
    ]


def candidate_dims(teacher: Dims, space: SearchSpace, pinned: dict[str, int]) -> list[Dims]:
    """Every shape the search considers; a pinned dim (explicit target) is held fixed."""
    low = max(1, math.ceil(space.min_layers_fraction * teacher.num_hidden_layers))
    axes = {
        "num_hidden_layers": list(range(low, teacher.num_hidden_layers + 1)),
        "hidden_size": _widths(teacher.hidden_size, space.min_hidden_fraction, space.hidden_step),
        "intermediate_size": _widths(
            teacher.intermediate_size, space.min_intermediate_fraction, space.intermediate_step
        ),
    }
    axes = {k: [pinned[k]] if pinned.get(k) else v for k, v in axes.items()}
    pin_h, pin_kv = pinned.get("num_attention_heads"), pinned.get("num_key_value_heads")
    pairs = _head_pairs(teacher, space.prune_heads or bool(pin_h or pin_kv))
    heads = [(h, kv) for h, kv in pairs if pin_h in (None, h) and pin_kv in (None, kv)]
    return [
        Dims(n, d, f, h, kv)
        for n in axes["num_hidden_layers"]
        for d in axes["hidden_size"]
        for f in axes["intermediate_size"]
        for h, kv in heads
    ]


def search_shape(
    model: nn.Module,
    scores: dict[str, Tensor],
    target_fraction: float,
    space: SearchSpace,
    pinned: dict[str, int] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """(chosen shape, every candidate considered, best first) for `target_fraction` of `model`."""
    considered = budget_candidates(model, target_fraction, space, pinned)
    teacher, head_dim = Dims.of(model.config), head_dim_of(model.config)
    for i, c in enumerate(considered):
        if c.in_window:  # scored only within the budget window
            plan = make_plan(scores, teacher, c.dims, head_dim)
            retained = math.prod(retained_importance(scores, plan).values())
            considered[i] = Candidate(c.dims, c.parameters, c.fraction, retained)
    feasible = [c for c in considered if not math.isnan(c.retained)]
    feasible.sort(key=lambda c: c.rank_key(target_fraction))
    return feasible[0], feasible + [c for c in considered if math.isnan(c.retained)]


def budget_candidates(
    model: nn.Module, target_fraction: float, space: SearchSpace, pinned: dict[str, int] | None
) -> list[Candidate]:
    """Every shape considered, unscored (`retained` NaN; `in_window` marks the budget window).

    Needs only the parameter shapes, so a meta-device model checks a budget before any
    calibration; raises ValueError when no shape lands in the window.
    """
    if not 0 < target_fraction <= 1:
        raise ValueError(f"student.params={target_fraction} must be a fraction in (0, 1]")
    teacher = Dims.of(model.config)
    total = parameters_for(model, teacher)
    considered = []
    shapes = candidate_dims(teacher, space, pinned or {})
    for dims in [d for d in shapes if config_problem(model.config, d) is None]:
        n = parameters_for(model, dims)
        fraction = n / total
        in_window = (1 - space.tolerance) * target_fraction <= fraction <= target_fraction
        considered.append(Candidate(dims, n, fraction, float("nan"), in_window))
    if not any(c.in_window for c in considered):
        closest = sorted(considered, key=lambda c: abs(c.fraction - target_fraction))[:3]
        raise ValueError(
            f"student.params={target_fraction}: no candidate shape within "
            f"-{space.tolerance:.0%} of {target_fraction} × {total:,} parameters; closest: "
            + "; ".join(f"{asdict(c.dims)} = {c.fraction:.3f}" for c in closest)
            + ". Lower the width floors (student.search.*) or pin fewer dims."
        )
    return considered


def print_candidates(
    candidates: list[Candidate],
    target_fraction: float,
    limit: int = 15,
    console: Console | None = None,
) -> None:
    """A table of the best feasible candidates (the chosen one first)."""
    feasible = [c for c in candidates if not math.isnan(c.retained)]
    table = Table(
        title=f"student shapes within budget ({target_fraction:.2f} of teacher): "
        f"{len(feasible)} of {len(candidates)} considered",
    )
    for column in ("", "layers", "hidden", "ffn", "heads/kv", "parameters", "fraction", "retained"):
        table.add_column(column, justify="right")
    for i, c in enumerate(feasible[:limit]):
        d = c.dims
        table.add_row(
            "→" if i == 0 else "",
            str(d.num_hidden_layers),
            str(d.hidden_size),
            str(d.intermediate_size),
            f"{d.num_attention_heads}/{d.num_key_value_heads}",
            f"{c.parameters:,}",
            f"{c.fraction:.3f}",
            f"{c.retained:.3f}",
        )
    (console or Console(stderr=True)).print(table)
