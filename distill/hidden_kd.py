"""Hidden-state KD: match student layer outputs to teacher layer outputs (Minitron, TinyBERT).

Pairs come from the prune stage when it kept whole teacher layers (`prune.json` kept_layers:
student layer i is teacher layer kept_layers[i]); otherwise student layer i maps proportionally
onto the teacher's depth. The final (normed) hidden states always pair with each other.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def layer_pairs(
    student_layers: int, teacher_layers: int, kept_layers: list[int] | None = None
) -> list[tuple[int, int]]:
    """(student, teacher) indices into HF `hidden_states` tuples (0 = embeddings, i = output of
    layer i, the last = final norm output)."""
    if kept_layers is not None:
        if len(kept_layers) != student_layers:
            raise ValueError(
                f"kept_layers has {len(kept_layers)} entries for a {student_layers}-layer student"
            )
        inner = [(i + 1, kept_layers[i] + 1) for i in range(student_layers - 1)]
    else:
        inner = [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers)]
    return [*inner, (student_layers, teacher_layers)]


def kept_layers_from(student_init_dir: str | Path) -> list[int] | None:
    """`kept_layers` from a prune stage's prune.json, when it kept whole layers."""
    path = Path(student_init_dir) / "prune.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record.get("kept_layers")


class HiddenStateKD(nn.Module):
    """Σ over pairs of MSE or (1 − cosine) between projected student and teacher states, / pairs.

    A learned linear projection (student width → teacher width) is used per pair when the widths
    differ (width-pruned students); equal widths compare directly.
    """

    def __init__(
        self,
        pairs: list[tuple[int, int]],
        student_width: int,
        teacher_width: int,
        kind: str = "mse",
    ) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"hidden-state loss must be mse or cosine, got '{kind}'")
        self.pairs, self.kind = pairs, kind
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False)
            if student_width != teacher_width
            else nn.Identity()
            for _ in pairs
        )
        log.info("hidden-state KD pairs (student, teacher): %s", pairs)

    def forward(
        self, student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...], mask: Tensor
    ) -> Tensor:
        """states: HF hidden_states tuples of (B, S, H); mask (B, S) bool selects positions."""
        total = student_states[0].new_zeros(())
        for (si, ti), proj in zip(self.pairs, self.projections, strict=True):
            s = proj(student_states[si][mask]).float()  # (N, H_t)
            t = teacher_states[ti][mask].float()
            if self.kind == "mse":
                total = total + F.mse_loss(s, t)
            else:
                total = total + (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        return total / len(self.pairs)
