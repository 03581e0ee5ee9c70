"""Knowledge-distillation losses on logits.

Every divergence takes student and teacher logits of shape (N, V) (rows already masked to
the positions that count), softmaxes in fp32 and returns the mean over rows. Temperature
follows Hinton et al.: both distributions are softened by T and the loss is scaled by T².
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher ‖ p_student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)), mean over rows, × T²."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return per_row.mean() * t * t if per_row.numel() else student_logits.sum() * 0.0


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-level CE on already shifted labels; IGNORE_INDEX rows are skipped."""
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


DIVERGENCES = {"forward_kl": forward_kl}


class KDLoss(nn.Module):
    """kd_weight · divergence(student, teacher; T) + ce_weight · CE(student, labels).

    Inputs are causal-LM logits (B, S, V) and labels (B, S) already shifted so that position i
    predicts labels[i]; positions whose label is IGNORE_INDEX are excluded from both terms.
    Vocabularies that differ only by padding rows are sliced to the shared size by the caller.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown KD loss '{kind}'; choose one of {sorted(DIVERGENCES)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kind, self.temperature = kind, temperature
        self.kd_weight, self.ce_weight = kd_weight, ce_weight

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor
    ) -> dict[str, Tensor]:
        valid = labels != IGNORE_INDEX  # (B, S)
        s = student_logits[valid]  # (N, V)
        out: dict[str, Tensor] = {}
        total = s.sum() * 0.0
        if self.kd_weight and teacher_logits is not None:
            out["kd"] = DIVERGENCES[self.kind](s, teacher_logits[valid], self.temperature)
            total = total + self.kd_weight * out["kd"]
        if self.ce_weight or teacher_logits is None:
            out["ce"] = cross_entropy(s, labels[valid])
            total = total + (self.ce_weight or 1.0) * out["ce"]
        out["loss"] = total
        return out
