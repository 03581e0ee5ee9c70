"""Teacher agreement on held-out blocks: top-1 next-token agreement and mean KL(teacher ‖ student),
with both models' perplexity from the same forward passes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.losses import forward_kl


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_agreement(
    teacher: nn.Module,
    student: nn.Module,
    blocks: Tensor,
    batch_size: int = 2,
    progress: bool = False,
    desc: str = "agreement",
) -> dict[str, float]:
    """Compare next-token distributions of `teacher` and `student` at every position of `blocks`.

    blocks: (num_blocks, seq_len) token ids; all seq_len − 1 next-token positions are scored.
    Returns top1_agreement (fraction of positions with the same argmax), kl_from_teacher
    (mean KL(p_t ‖ p_s) in nats per token), teacher_nll / student_nll and their perplexities,
    and `per_block`: one {agree, kl, nll_t, nll_s, positions} sum record per block (the items
    of the report's bootstrap intervals).
    """
    totals = {"agree": 0.0, "kl": 0.0, "nll_t": 0.0, "nll_s": 0.0}
    positions = 0
    per_block: list[dict] = []
    for i in tqdm(range(0, len(blocks), batch_size), disable=not progress, desc=desc):
        ids = blocks[i : i + batch_size]
        rows = ids[:, 1:].numel() // len(ids)
        targets = ids[:, 1:].flatten()
        # fp32 log-softmax: (B, S-1, V) → (B·(S-1), V)
        log_pt = F.log_softmax(
            teacher(input_ids=ids.to(_device(teacher)), use_cache=False).logits[:, :-1].float(), -1
        ).flatten(0, 1)
        log_ps = F.log_softmax(
            student(input_ids=ids.to(_device(student)), use_cache=False).logits[:, :-1].float(), -1
        ).flatten(0, 1)
        log_ps = log_ps.to(log_pt.device)
        targets = targets.to(log_pt.device)
        per_position = {  # (B·(S-1),) each
            "agree": (log_pt.argmax(-1) == log_ps.argmax(-1)).double(),
            "kl": forward_kl(log_ps, log_pt).double(),
            "nll_t": F.nll_loss(log_pt, targets, reduction="none").double(),
            "nll_s": F.nll_loss(log_ps, targets, reduction="none").double(),
        }
        by_block = {k: v.view(len(ids), rows).sum(-1).tolist() for k, v in per_position.items()}
        for b in range(len(ids)):
            per_block.append({k: by_block[k][b] for k in by_block} | {"positions": rows})
        for key, values in by_block.items():
            totals[key] += sum(values)
        positions += targets.numel()
    n = max(positions, 1)
    return {
        "top1_agreement": totals["agree"] / n,
        "kl_from_teacher": totals["kl"] / n,
        "teacher_nll": totals["nll_t"] / n,
        "student_nll": totals["nll_s"] / n,
        "teacher_perplexity": math.exp(min(totals["nll_t"] / n, 50.0)),
        "student_perplexity": math.exp(min(totals["nll_s"] / n, 50.0)),
        "tokens": positions,
        "per_block": per_block,
    }
