"""Knowledge-distillation losses on logits.

Divergences take fp32 log-probabilities of shape (N, V) — student `log_ps`, teacher `log_pt` —
and return one value per row (N,). `KDLoss` turns logits into log-probs (temperature T, fp32
softmax), masks ignored positions, works through the rows in chunks and scales by T² (Hinton
et al.) so gradients keep their size across temperatures.

Chunking: a 150k-vocabulary model at batch 8 × 2048 tokens would need 10 GB for one fp32 logit
tensor. `KDLoss` accepts either logits or final hidden states plus the lm_head (`HeadStates`);
with hidden states each chunk's logits are computed, used and — through activation
checkpointing — recomputed in backward, so at most one chunk of logits exists at a time.

Sparse teacher (`TopK`): an offline cache holds the teacher's top-k log-probs. The divergence
is then taken between (k+1)-bucket distributions — the k tokens plus one "rest" bucket with
the remaining mass of each side — so the tail is counted rather than silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row; 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b), computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v)); mode-covering. (N, V) → (N,).

    Taken as Σ p_t log p_t − Σ p_t log p_s (the same value and gradient as `_kl`): each term
    makes one (N, V) temporary, summed and dropped at once, and backward keeps only p_t — where
    `_kl` holds a difference, a product, a mask and the masked copy. These rows are the step's
    largest tensors: at 1,016 rows × 49,152 that is 190 MiB each.
    """
    p_t = log_pt.exp()
    # xlogy(0, 0) = 0: 0·log 0 counts as 0 where the teacher is 0. The cross term is unguarded:
    # a student's log-probs are finite (finite logits), so p_t = 0 gives 0 there.
    return torch.xlogy(p_t, p_t).sum(-1) - (p_t * log_ps).sum(-1)


def reverse_kl(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """KL(p_s ‖ p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v)); mode-seeking. (N, V) → (N,)."""
    return _kl(log_ps, log_pt)


def generalized_jsd(log_ps: Tensor, log_pt: Tensor, beta: float = 0.5) -> Tensor:
    """JSD_β = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m), m = β p_t + (1 − β) p_s, 0 < β < 1.

    β → 0 behaves like forward KL, β → 1 like reverse KL (up to scale; Agarwal et al., GKD).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    log_m = _mix(log_pt, log_ps, beta)
    return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)


def skew_forward_kl(log_ps: Tensor, log_pt: Tensor, alpha: float = 0.1) -> Tensor:
    """SKL_α = KL(p_t ‖ α p_t + (1 − α) p_s), 0 ≤ α < 1 (DistiLLM); α = 0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    return _kl(log_pt, _mix(log_pt, log_ps, alpha) if alpha else log_ps)


def skew_reverse_kl(log_ps: Tensor, log_pt: Tensor, alpha: float = 0.1) -> Tensor:
    """SRKL_α = KL(p_s ‖ α p_s + (1 − α) p_t), 0 ≤ α < 1 (DistiLLM); α = 0 is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    return _kl(log_ps, _mix(log_ps, log_pt, alpha) if alpha else log_pt)


def total_variation(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """TV(p_s, p_t) = ½ Σ_v |p_s(v) − p_t(v)|, in [0, 1]. (N, V) → (N,)."""
    return 0.5 * (log_ps.exp() - log_pt.exp()).abs().sum(-1)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}
_PARAMS = {"jsd": "beta", "skew_forward_kl": "alpha", "skew_reverse_kl": "alpha"}


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-level CE on already shifted labels; IGNORE_INDEX rows are skipped."""
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


@dataclass
class HeadStates:
    """Logits given as final hidden states (N, H) and the lm_head mapping them to (N, V)."""

    states: Tensor
    head: nn.Module

    def __getitem__(self, index) -> HeadStates:
        return HeadStates(self.states[index], self.head)


@dataclass
class TopK:
    """A sparse teacher: its top-k log-probs (N, k) at the cache temperature and their ids (N, k)."""

    log_probs: Tensor
    indices: Tensor

    def __getitem__(self, index) -> TopK:
        return TopK(self.log_probs[index], self.indices[index])


def _logits(source: Tensor | HeadStates, vocab: int | None) -> Tensor:
    logits = source.head(source.states) if isinstance(source, HeadStates) else source
    return logits[..., :vocab] if vocab is not None else logits


def topk_buckets(student_log_probs: Tensor, teacher: TopK) -> tuple[Tensor, Tensor]:
    """(k+1)-bucket log-probs for student and teacher: the k cached tokens, then "the rest".

    student_log_probs: (N, V) full log-softmax; returns two (N, k+1) tensors. Each side's rest
    bucket is log(1 − Σ_topk p), clamped so a teacher whose top-k holds all mass stays finite.
    """
    idx = teacher.indices.long()
    s_top = student_log_probs.gather(-1, idx)  # (N, k)
    t_top = teacher.log_probs.float()
    # log1p(-Σp) loses precision when Σp → 1; both sides use the same formula, so it cancels.
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
    return torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1)


class KDLoss(nn.Module):
    """kd_weight · T² · divergence(student, teacher; T) + ce_weight · CE(student, labels).

    The other fields configure the DistillModule that uses this loss: `hidden_weight` /
    `hidden_loss` (hidden-state KD, mse | cosine), `on_policy_fraction` (GKD: share of batches
    on student-sampled continuations), `cache` (directory of an offline top-k teacher cache;
    training then runs without the teacher) and `top_k` (entries per token written to it).
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        chunk_size: int = 1024,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        on_policy_fraction: float = 0.0,
        cache: str | None = None,
        top_k: int = 64,
    ) -> None:
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown KD loss '{kind}'; choose one of {sorted(DIVERGENCES)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        if hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss must be mse or cosine, got '{hidden_loss}'")
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
        self.kind, self.temperature = kind, temperature
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.params = (
            {_PARAMS[kind]: {"beta": beta, "alpha": alpha}[_PARAMS[kind]]}
            if kind in _PARAMS
            else {}
        )
        DIVERGENCES[kind](torch.zeros(1, 2), torch.zeros(1, 2), **self.params)  # validates β/α
        self.chunk_size = chunk_size
        self.hidden_weight, self.hidden_loss = hidden_weight, hidden_loss
        self.on_policy_fraction = on_policy_fraction
        self.cache, self.top_k = cache, top_k

    def log_probs(self, logits: Tensor) -> Tensor:
        """fp32 log-softmax at the temperature (at T = 1 no scaled copy of the logits is made:
        the rows are the largest tensors of a step)."""
        t = self.temperature
        logits = logits.float()
        return F.log_softmax(logits if t == 1 else logits / t, dim=-1)

    def divergence(self, student_logits: Tensor, teacher: Tensor | TopK) -> Tensor:
        """Per-row divergence (N,) × T² for logits (N, V) against dense or top-k teacher rows."""
        if not isinstance(teacher, TopK):
            teacher = self.log_probs(teacher)
        return self._divergence(self.log_probs(student_logits), teacher)

    def _divergence(self, log_ps: Tensor, teacher: Tensor | TopK) -> Tensor:
        """`teacher`: its log-probs at the temperature (N, V), or its top-k rows."""
        t = self.temperature
        if isinstance(teacher, TopK):
            log_ps, teacher = topk_buckets(log_ps, teacher)
        return DIVERGENCES[self.kind](log_ps, teacher, **self.params) * (t * t)

    def _chunk_sums(
        self, student, teacher, labels: Tensor, vocab: int | None, with_kd: bool, with_ce: bool
    ) -> Tensor:
        """(Σ divergence, Σ CE) over one chunk of rows; logits live only inside this call, and
        no longer than needed: each full-vocabulary row tensor is the size of the step's peak."""
        s = _logits(student, vocab)
        zero = s.new_zeros((), dtype=torch.float32)
        if not with_kd:
            return torch.stack([zero, F.cross_entropy(s.float(), labels, reduction="sum")])
        log_ps = self.log_probs(s)
        # At T = 1, CE is the NLL of the log-probs KD already holds (no second softmax).
        ce_from_log_ps = with_ce and self.temperature == 1
        ce = zero
        if with_ce and not ce_from_log_ps:
            ce = F.cross_entropy(s.float(), labels, reduction="sum")
        del s  # log_softmax's backward needs only its output
        with torch.no_grad():
            t = teacher if isinstance(teacher, TopK) else self.log_probs(_logits(teacher, vocab))
        kd = self._divergence(log_ps, t).sum()
        del t
        if ce_from_log_ps:
            ce = F.nll_loss(log_ps, labels, reduction="sum")
        return torch.stack([kd, ce])

    def forward(
        self,
        student: Tensor | HeadStates,
        teacher: Tensor | HeadStates | TopK | None,
        labels: Tensor,
        vocab: int | None = None,
    ) -> dict[str, Tensor]:
        """student/teacher rows (B, S, ·) and labels (B, S) already shifted so that position i
        predicts labels[i]; IGNORE_INDEX positions count in neither term. `vocab` slices both
        sides' logits to the shared vocabulary (padding rows only; see distill.vocab)."""
        valid = labels != IGNORE_INDEX  # (B, S)
        student = student[valid]
        teacher = teacher[valid] if teacher is not None else None
        rows = labels[valid]  # (N,)
        with_kd = bool(self.kd_weight) and teacher is not None
        with_ce = bool(self.ce_weight) or teacher is None
        n = rows.numel()
        ref = student.states if isinstance(student, HeadStates) else student
        sums = ref.new_zeros(2, dtype=torch.float32) + ref.sum() * 0.0  # keeps the graph
        for start in range(0, n, self.chunk_size):
            part = slice(start, start + self.chunk_size)
            args = (student[part], teacher[part] if teacher is not None else None, rows[part])
            if torch.is_grad_enabled() and isinstance(student, HeadStates) and n > self.chunk_size:
                # Recompute this chunk's logits in backward instead of keeping them.
                sums = sums + checkpoint(
                    self._chunk_sums, *args, vocab, with_kd, with_ce, use_reentrant=False
                )
            else:
                sums = sums + self._chunk_sums(*args, vocab, with_kd, with_ce)
        denom = max(n, 1)
        out: dict[str, Tensor] = {}
        total = sums.sum() * 0.0
        if with_kd:
            out["kd"] = sums[0] / denom
            total = total + self.kd_weight * out["kd"]
        if with_ce:
            out["ce"] = sums[1] / denom
            total = total + (self.ce_weight or 1.0) * out["ce"]
        out["loss"] = total
        return out
