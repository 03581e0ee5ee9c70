"""The LightningModule that distills a frozen teacher into a student."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import Tensor, nn

from distill.losses import IGNORE_INDEX, KDLoss


def shift_labels(input_ids: Tensor) -> Tensor:
    """Labels for causal LM logits: position i predicts token i+1; the last position is ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class DistillModule(L.LightningModule):
    """Student trained on KD(teacher) + optional CE; the teacher stays frozen in eval mode.

    With `teacher=None` the same module does plain CE fine-tuning (a baseline).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        loss: KDLoss,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.student, self.loss = student, loss
        # Kept out of the module tree so checkpoints, optimizers and DDP never see it.
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self._step_start: float | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def _logits(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (input_ids,) = batch
        labels = shift_labels(input_ids)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self._logits(self.teacher, input_ids)
        student_logits = self._logits(self.student, input_ids)
        if teacher_logits is not None:
            vocab = min(student_logits.size(-1), teacher_logits.size(-1))  # padding rows only
            student_logits, teacher_logits = (
                student_logits[..., :vocab],
                teacher_logits[..., :vocab],
            )
        out = self.loss(student_logits, teacher_logits, labels)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return out["loss"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_start is not None:
            tokens = batch[0].numel()
            self.log("train/tokens_per_s", tokens / (time.perf_counter() - self._step_start))

    def validation_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (input_ids,) = batch
        logits = self._logits(self.student, input_ids)[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum"
        )
        self._val_sums[0] += nll.detach()
        self._val_sums[1] += input_ids[:, 1:].numel()

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [torch.zeros((), device=self.device, dtype=torch.float64), 0]

    def on_validation_epoch_end(self) -> None:
        nll, count = self._val_sums
        total = self.all_gather(nll).sum() if self.trainer.world_size > 1 else nll
        n = count * self.trainer.world_size
        mean_nll = (total / max(n, 1)).item()
        self.log("val/nll", mean_nll, sync_dist=False)
        self.log("val/perplexity", math.exp(min(mean_nll, 50.0)), prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas
        )
        total = max(self.trainer.estimated_stepping_batches, 1)

        def schedule(step: int) -> float:  # linear warmup, cosine decay to min_lr_ratio
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min((step - self.warmup_steps) / max(total - self.warmup_steps, 1), 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
