"""Importance scores from one calibration pass over the teacher (Minitron, Muralidharan et al. 2024).

One forward pass per calibration batch, with hooks, gives every score the pruner needs:

| key        | shape     | score                                                              |
|------------|-----------|--------------------------------------------------------------------|
| `layers`   | (L,)      | 1 − cos(layer input, layer output), mean over tokens               |
| `neurons`  | (L, F)    | mean |activation| at the MLP down-projection input                  |
| `heads`    | (L, H)    | mean L2 norm of each head's output at the o-projection input       |
| `channels` | (d,)      | mean |output| of every norm layer (per-layer norms + final), summed  |

Scores are saved to `importance.pt`, so re-pruning to other targets needs no new pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.prune.adapters import adapter_for

log = logging.getLogger(__name__)

SCORE_KEYS = ("layers", "neurons", "heads", "channels")


@torch.no_grad()
def calibration_scores(model: nn.Module, batches: list, progress: bool = True) -> dict[str, Tensor]:
    """All importance scores (table above) from one pass over `batches`: (B, S) token ids, or
    dicts of the decoder's keyword inputs (`inputs_embeds` with image features merged in, a
    vision tower's `pixel_values`)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    config = model.config
    num_heads = config.num_attention_heads
    n_layers = len(layers)
    sums = {
        "layers": torch.zeros(n_layers, dtype=torch.float64),
        "neurons": torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64),
        "heads": torch.zeros(n_layers, num_heads, dtype=torch.float64),
        "channels": torch.zeros(config.hidden_size, dtype=torch.float64),
    }
    tokens = [0]  # tokens seen; every score is a per-token mean

    def block_hook(i: int):
        def fn(module, args, kwargs, output) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            sums["layers"][i] += (1 - cos).sum().double().cpu()

        return fn

    def down_hook(i: int):
        def fn(module, args) -> None:
            act = args[0].float()  # (B, S, F)
            sums["neurons"][i] += act.abs().sum(dim=(0, 1)).double().cpu()

        return fn

    def o_hook(i: int):
        def fn(module, args) -> None:
            x = args[0].float()  # (B, S, H * head_dim)
            per_head = x.unflatten(-1, (num_heads, -1)).norm(dim=-1)  # (B, S, H)
            sums["heads"][i] += per_head.sum(dim=(0, 1)).double().cpu()

        return fn

    def norm_hook(module, args, output) -> None:
        sums["channels"] += output.float().abs().sum(dim=(0, 1)).double().cpu()  # (d,)

    def final_norm_hook(module, args, output) -> None:
        norm_hook(module, args, output)
        tokens[0] += output.shape[:-1].numel()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        handles.append(
            layer.get_submodule(adapter.mlp_down).register_forward_pre_hook(down_hook(i))
        )
        handles.append(layer.get_submodule(adapter.attn_out).register_forward_pre_hook(o_hook(i)))
        handles += [layer.get_submodule(n).register_forward_hook(norm_hook) for n in adapter.norms]
    handles.append(model.get_submodule(adapter.final_norm).register_forward_hook(final_norm_hook))

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        decoder = model.get_submodule(adapter.base)  # no logits needed: skip the LM head
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
            extra = {} if "pixel_values" in inputs else {"use_cache": False}  # a vision tower
            decoder(**{k: v.to(device) for k, v in inputs.items()}, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (v / max(tokens[0], 1)).float() for k, v in sums.items()}


def layer_importance(model: nn.Module, batches: list[Tensor], progress: bool = True) -> Tensor:
    """Block importance 1 − cos(layer input, layer output), one per layer: (num_layers,).

    A layer that barely changes its residual stream (cosine close to 1) is the cheapest to drop.
    """
    return calibration_scores(model, batches, progress)["layers"]


def cached_scores(
    path: Path, compute: Callable[[], dict[str, Tensor]], meta: dict | None = None
) -> dict[str, Tensor]:
    """Scores from `path` when it holds every score for the same `meta`, else computed and saved.

    `meta` names what the scores depend on (teacher, calibration sample count); a cache written
    for other settings, or lacking a score, is recomputed rather than silently reused.
    """
    meta = meta or {}
    if path.exists():
        cached = torch.load(path)
        missing = [k for k in SCORE_KEYS if k not in cached]
        if not missing and cached.get("meta", {}) == meta:
            log.info("importance scores from cache %s", path)
            return cached
        log.warning("recomputing %s: cache lacks %s or was made with %s", path, missing, meta)
    scores = {**compute(), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(scores, path)
    log.info("importance scores saved to %s", path)
    return scores
