"""Depth pruning: drop the whole decoder layers with the lowest block importance."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from distill.prune.importance import decoder_layers


def layers_to_keep(importance: Tensor, num_layers: int) -> list[int]:
    """Indices (ascending) of the `num_layers` most important layers."""
    total = importance.numel()
    if not 1 <= num_layers <= total:
        raise ValueError(f"cannot keep {num_layers} of {total} layers")
    top = torch.topk(importance, num_layers).indices
    return sorted(top.tolist())


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A new model of the same class with only the `keep` layers, weights copied from `model`."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    for per_layer in ("layer_types", "sliding_window_layers"):  # per-layer lists in newer configs
        values = getattr(config, per_layer, None)
        if isinstance(values, list) and len(values) == len(decoder_layers(model)):
            setattr(config, per_layer, [values[i] for i in keep])
    student = type(model)(config)  # fresh modules so each attention's layer_idx is renumbered
    source = decoder_layers(model)
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new_i, old_i in enumerate(keep):
        for k, v in source[old_i].state_dict().items():
            state[f"model.layers.{new_i}.{k}"] = v
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"slicing layers left missing={missing} unexpected={unexpected}")
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.to(next(model.parameters()).dtype)
