"""Importance scores from a calibration pass over the teacher (Minitron, Muralidharan et al. 2024)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no `model.layers`; not a Llama-family decoder")
    return layers


@torch.no_grad()
def layer_importance(model: nn.Module, batches: list[Tensor], progress: bool = True) -> Tensor:
    """Block importance 1 − cos(layer input, layer output), averaged over tokens, one per layer.

    A layer that barely changes its residual stream (cosine close to 1) is the cheapest to drop.
    `batches` are (B, S) token ids; returns a (num_layers,) float tensor.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            sums[index] += (1 - cos).sum().double().cpu()
            counts[index] += cos.numel()

        return fn

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for ids in tqdm(batches, desc="calibration", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (sums / counts.clamp(min=1)).float()


def cached_scores(path: Path, compute) -> dict[str, Tensor]:
    """Load scores from `path` if present, else compute and save them (re-pruning needs no pass)."""
    if path.exists():
        log.info("importance scores from cache %s", path)
        return torch.load(path)
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(scores, path)
    return scores
