"""Depth pruning: drop the whole decoder layers with the lowest block importance."""

from __future__ import annotations

from torch import Tensor, nn

from distill.prune.plan import Dims, PrunePlan, head_dim_of, top_units
from distill.prune.slicing import slice_model


def layers_to_keep(importance: Tensor, num_layers: int) -> list[int]:
    """Indices (ascending) of the `num_layers` most important layers."""
    if not 1 <= num_layers <= importance.numel():
        raise ValueError(f"cannot keep {num_layers} of {importance.numel()} layers")
    return top_units(importance, num_layers)


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A new model of the same class with only the `keep` layers, weights copied from `model`."""
    teacher = Dims.of(model.config)
    plan = PrunePlan(
        dims=teacher.replace(num_hidden_layers=len(keep)),
        head_dim=head_dim_of(model.config),
        layers=list(keep),
        channels=list(range(teacher.hidden_size)),
        neurons=[list(range(teacher.intermediate_size))] * len(keep),
        heads=[list(range(teacher.num_attention_heads))] * len(keep),
        kv_heads=[list(range(teacher.num_key_value_heads))] * len(keep),
    )
    return slice_model(model, plan)
