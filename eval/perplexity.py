"""Held-out perplexity of a causal LM on packed token blocks."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks: Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, float]:
    """exp(mean next-token NLL) over all positions of `blocks` (num_blocks, seq_len).

    Returns perplexity, mean nll, the number of scored tokens and the wall time in seconds.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
        ids = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, S-1, V)
        total_nll += F.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        ).item()
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    nll = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(min(nll, 50.0)),
        "nll": nll,
        "tokens": total_tokens,
        "seconds": time.perf_counter() - start,
    }
