"""Target dims and the plan of which teacher units (layers, channels, neurons, heads) to keep."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

DIM_NAMES = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def head_dim_of(config) -> int:
    """Per-head width: the config's explicit head_dim, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Dims:
    """A student shape; head_dim always stays the teacher's (RoPE is per head)."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @classmethod
    def of(cls, config) -> Dims:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            kv,
        )

    def replace(self, **changes) -> Dims:
        return Dims(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def check_within(self, teacher: Dims) -> None:
        """Raise ValueError unless this shape can be sliced out of `teacher` with GQA intact."""
        for f in fields(self):
            value, limit = getattr(self, f.name), getattr(teacher, f.name)
            if not 1 <= value <= limit:
                raise ValueError(f"student {f.name}={value} must be in 1..{limit} (the teacher's)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA)"
            )
        group, teacher_group = self.group_size, teacher.group_size
        if group > teacher_group:
            raise ValueError(
                f"{self.num_attention_heads} heads over {self.num_key_value_heads} KV heads needs "
                f"{group} query heads per KV group; the teacher has only {teacher_group}"
            )

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass
class PrunePlan:
    """Which teacher units the student keeps (all index lists ascending, teacher numbering)."""

    dims: Dims
    head_dim: int
    layers: list[int]  # kept decoder layers
    channels: list[int]  # kept hidden (embedding) channels
    neurons: list[list[int]]  # per kept layer: kept MLP neurons
    heads: list[list[int]]  # per kept layer: kept query heads, grouped by their KV head
    kv_heads: list[list[int]]  # per kept layer: kept KV heads


def top_units(scores: Tensor, k: int) -> list[int]:
    """Indices (ascending, so order is preserved) of the `k` highest scores."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    return sorted(torch.topk(scores, k).indices.tolist())


def select_heads(
    head_scores: Tensor, num_kv_heads: int, new_heads: int, new_kv_heads: int
) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) to keep so every kept KV group keeps the same number of heads.

    Query head h belongs to KV group h // (H / K). Each group keeps its best H'/K' query heads;
    the K' groups whose kept heads score highest survive whole. `head_scores` is (H,).
    """
    num_heads = head_scores.numel()
    group, new_group = num_heads // num_kv_heads, new_heads // new_kv_heads
    per_group = head_scores.view(num_kv_heads, group)  # (K, H/K)
    best = torch.topk(per_group, new_group, dim=1)
    kv_keep = top_units(best.values.sum(dim=1), new_kv_heads)
    heads = [g * group + h for g in kv_keep for h in sorted(best.indices[g].tolist())]
    return heads, kv_keep


def make_plan(scores: dict[str, Tensor], teacher: Dims, dims: Dims, head_dim: int) -> PrunePlan:
    """Keep the highest-importance units of every axis for the shape `dims`."""
    dims.check_within(teacher)
    layers = top_units(scores["layers"], dims.num_hidden_layers)
    heads = [
        select_heads(
            scores["heads"][i],
            teacher.num_key_value_heads,
            dims.num_attention_heads,
            dims.num_key_value_heads,
        )
        for i in layers
    ]
    return PrunePlan(
        dims=dims,
        head_dim=head_dim,
        layers=layers,
        channels=top_units(scores["channels"], dims.hidden_size),
        neurons=[top_units(scores["neurons"][i], dims.intermediate_size) for i in layers],
        heads=[q for q, _ in heads],
        kv_heads=[kv for _, kv in heads],
    )


def retained_importance(scores: dict[str, Tensor], plan: PrunePlan) -> dict[str, float]:
    """Fraction of each axis's total importance the plan keeps (1.0 = nothing of value cut).

    Per-layer axes (neurons, heads) average the per-layer fraction over the kept layers.
    """

    def kept(row: Tensor, idx: list[int]) -> float:
        return float(row[idx].sum() / row.sum().clamp(min=1e-12))

    return {
        "layers": kept(scores["layers"], plan.layers),
        "channels": kept(scores["channels"], plan.channels),
        "neurons": sum(
            kept(scores["neurons"][i], n) for i, n in zip(plan.layers, plan.neurons, strict=True)
        )
        / len(plan.layers),
        "heads": sum(
            kept(scores["heads"][i], h) for i, h in zip(plan.layers, plan.heads, strict=True)
        )
        / len(plan.layers),
    }
