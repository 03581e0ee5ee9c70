"""The LightningModule for vision-language models on VQA: supervised answers (the teacher) or
logit KD on the answer tokens from a frozen VLM teacher, plus optional connector feature KD
(the student).

Only answer positions reach the LM head (`KDLoss` with `HeadStates`): 2 rows a sample instead
of ~40 × 49k logits. Parameter groups: the vision tower + connector learn at `vision_lr`
(trained from scratch), the connector at `connector_lr` (default `lr`: it has no norm after it,
and at the ViT's rate its outputs grew to 24× the text embeddings' norm and the LM learned to
ignore them), everything else that is trainable at `lr`.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.data.vqa import trim_padding
from distill.losses import IGNORE_INDEX, HeadStates, KDLoss
from distill.module import warmup_cosine


def param_group(name: str) -> str:
    """'vision' (the ViT), 'connector' or 'lm' for a parameter name of an Idefics3 model."""
    if ".vision_model." in f".{name}":
        return "vision"
    return "connector" if ".connector." in f".{name}" else "lm"


class VQAModule(L.LightningModule):
    """Idefics3 student (or teacher being trained) on answer tokens; see module doc.

    `feature_channels`: the teacher's LM hidden channels the student kept (prune plan), so
    connector feature KD compares student image embeddings with those channels of the
    teacher's, MSE, no learned projection.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: KDLoss,
        teacher: nn.Module | None = None,
        lr: float = 1e-4,
        vision_lr: float = 1e-3,
        connector_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        feature_kd_weight: float = 0.0,
        feature_channels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self._teacher = [teacher] if teacher is not None else []  # outside the module tree
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if feature_kd_weight > 0 and teacher is None:
            raise ValueError("connector feature KD (feature_kd_weight > 0) needs a teacher")
        self.lr, self.vision_lr, self.weight_decay, self.betas = lr, vision_lr, weight_decay, betas
        self.connector_lr = lr if connector_lr is None else connector_lr
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.feature_kd_weight = feature_kd_weight
        self.feature_channels = feature_channels
        self._step_start: float | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        self.model.train()
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    @staticmethod
    def forward_rows(model: nn.Module, batch: dict[str, Tensor], features: bool = False):
        """(HeadStates [B, S-1, d] whose position i predicts token i+1, image embeddings
        [images, tokens, d] or None)."""
        captured = []
        hook = None
        if features:
            hook = model.model.connector.register_forward_hook(
                lambda m, a, out: captured.append(out)
            )
        try:
            out = model.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                use_cache=False,
            )
        finally:
            if hook is not None:
                hook.remove()
        rows = HeadStates(out.last_hidden_state[:, :-1], model.get_output_embeddings())
        return rows, (captured[0] if captured else None)

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = trim_padding(batch)
        labels = batch["labels"][:, 1:]  # (B, S-1): position i predicts token i+1
        want_features = self.feature_kd_weight > 0
        rows, features = self.forward_rows(self.model, batch, want_features)
        teacher_rows = teacher_features = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_rows, teacher_features = self.forward_rows(
                    self.teacher, batch, want_features
                )
        out = self.loss(rows, teacher_rows, labels)
        if want_features:
            target = teacher_features
            if self.feature_channels is not None:
                target = target[..., self.feature_channels]
            out["feature"] = F.mse_loss(features.float(), target.float())
            out["loss"] = out["loss"] + self.feature_kd_weight * out["feature"]
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True)
        return out["loss"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_start is not None:
            seconds = time.perf_counter() - self._step_start
            self.log("train/samples_per_s", batch["input_ids"].shape[0] / seconds)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Answer-token accuracy under teacher forcing (every answer token right = a hit)."""
        batch = trim_padding(batch)
        labels = batch["labels"][:, 1:]
        rows, _ = self.forward_rows(self.model, batch)
        valid = labels != IGNORE_INDEX
        pred = torch.full_like(labels, IGNORE_INDEX)
        pred[valid] = rows.head(rows.states[valid]).argmax(-1)
        hits = ((pred == labels) | ~valid).all(1).float()
        self.log("val/answer_accuracy", hits.mean(), prog_bar=True, batch_size=len(hits))

    def configure_optimizers(self):
        groups: dict[str, list] = {"vision": [], "connector": [], "lm": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups[param_group(name)].append(p)
        lrs = {"vision": self.vision_lr, "connector": self.connector_lr, "lm": self.lr}
        params = [{"params": groups[k], "lr": lrs[k]} for k in groups]
        params = [g for g in params if g["params"]]
        optimizer = torch.optim.AdamW(params, weight_decay=self.weight_decay, betas=self.betas)
        total = max(self.trainer.estimated_stepping_batches, 1)
        return warmup_cosine(optimizer, self.warmup_steps, total, self.min_lr_ratio)
