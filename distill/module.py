"""The LightningModule that distills a frozen teacher (or its offline top-k cache) into a student."""

from __future__ import annotations

import logging
import math
import random
import time

import lightning as L
import torch
from torch import Tensor, nn

from distill.hidden_kd import HiddenStateKD
from distill.losses import IGNORE_INDEX, HeadStates, KDLoss, TopK

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


def shift_labels(input_ids: Tensor) -> Tensor:
    """Labels for causal LM logits: position i predicts token i+1; the last position is ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def output_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _is_fsdp(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> dict:
    """Lightning's optimizer config with a per-step schedule: linear warmup over `warmup_steps`,
    then cosine decay to `min_lr_ratio` of the base rate at `total_steps`."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DistillModule(L.LightningModule):
    """Student trained on KD + optional CE / hidden-state KD; the teacher stays frozen in eval.

    Teacher signal, per batch: the live teacher (`teacher`), or cached top-k log-probs that the
    datamodule yields next to the tokens (`teacher=None`, batches `(ids, log_probs, indices)`).
    With neither, the same module does plain CE fine-tuning (a baseline). `vocab_size` is the
    shared logit width (distill.vocab.shared_vocab_size); `hidden_pairs` switches on hidden-state
    KD (distill.hidden_kd.layer_pairs) when `loss.hidden_weight > 0`.
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
        optimizer: str = "adamw",
        vocab_size: int | None = None,
        hidden_pairs: list[tuple[int, int]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{optimizer}'; choose one of {OPTIMIZERS}")
        self.student, self.loss = student, loss
        # Kept out of the module tree so checkpoints, optimizers and DDP never see it; FSDP
        # shards it explicitly in configure_model.
        self._teacher = [teacher] if teacher is not None else []
        self._teacher_sharded = False
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            rows = (output_rows(student), output_rows(teacher))
            if vocab_size is None and rows[0] != rows[1]:
                raise ValueError(
                    f"student has {rows[0]} output rows, teacher {rows[1]}: pass vocab_size from "
                    "distill.vocab.shared_vocab_size (checks the tokenizers agree)"
                )
        if teacher is None and loss.on_policy_fraction > 0:
            raise ValueError("on-policy KD (on_policy_fraction > 0) needs a live teacher to score")
        self.vocab_size = vocab_size
        self.hidden_kd: HiddenStateKD | None = None
        if loss.hidden_weight > 0:
            if teacher is None or hidden_pairs is None:
                raise ValueError("hidden-state KD needs a live teacher and hidden_pairs")
            self.hidden_kd = HiddenStateKD(
                hidden_pairs,
                student.config.hidden_size,
                teacher.config.hidden_size,
                loss.hidden_loss,
            )
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.optimizer_name, self.seed = optimizer, seed
        self._step_start: float | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def configure_model(self) -> None:
        """Under FSDP the teacher is sharded like the student (per decoder layer), not replicated
        unwrapped on every rank; under DDP / DeepSpeed each rank holds a replica."""
        if self.teacher is None or self._teacher_sharded or not _is_fsdp(self.trainer.strategy):
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_types = {type(layer) for layer in self.teacher.base_model.layers}
        self._teacher[0] = FullyShardedDataParallel(
            self.teacher,
            auto_wrap_policy=ModuleWrapPolicy(layer_types),
            device_id=self.trainer.strategy.root_device,
            use_orig_params=True,
        )
        self._teacher_sharded = True

    def on_fit_start(self) -> None:
        self.student.train()  # from_pretrained returns eval mode; Lightning keeps modes as given
        if self.teacher is None or self._teacher_sharded:
            return
        # bitsandbytes 8-bit teachers are placed at load time and refuse `.to()`.
        if getattr(self.teacher, "hf_quantizer", None) is None:
            self.teacher.to(self.device)
        self.teacher.eval()

    def _logits(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    def _rows(self, model: nn.Module, input_ids: Tensor, hidden: bool):
        """(rows for the loss, hidden_states tuple or None) without the full logit tensor: the
        body's final states + lm_head, applied chunk by chunk inside KDLoss."""
        if model is self.teacher and self._teacher_sharded:
            # An FSDP root must run its own forward; the teacher's dense logits (no grad, in the
            # teacher's dtype) then feed the chunked fp32 softmax.
            out = model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
            return out.logits, out.hidden_states
        out = model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        return HeadStates(out.last_hidden_state, model.get_output_embeddings()), out.hidden_states

    def on_policy_now(self, step: int) -> bool:
        """GKD: whether batch `step` uses student-sampled continuations (seeded by step, so a
        resumed run makes the same choices)."""
        fraction = self.loss.on_policy_fraction
        if fraction <= 0 or self.teacher is None:
            return False
        return random.Random(self.seed * 1_000_003 + step).random() < fraction

    @torch.no_grad()
    def sample_continuations(self, input_ids: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Keep the first half of each block as prompt, let the student sample the rest.

        Sampling draws from an RNG seeded by (seed, step) and leaves the global RNG as it was,
        so a resumed run samples exactly what the uninterrupted run did (the global RNG is not
        part of a checkpoint). Returns the new ids (B, S) and labels (B, S) covering only the
        sampled tokens.
        """
        prompt_len = max(input_ids.size(1) // 2, 1)
        new = input_ids.size(1) - prompt_len
        was_training = self.student.training
        self.student.eval()
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + step)
            ids = self.student.generate(
                input_ids=input_ids[:, :prompt_len],
                attention_mask=torch.ones_like(input_ids[:, :prompt_len]),
                max_new_tokens=new,
                min_new_tokens=new,  # fixed shape: EOS is suppressed until the block is full
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=self.student.config.eos_token_id,
            )
        self.student.train(was_training)
        labels = shift_labels(ids)
        labels[:, : prompt_len - 1] = IGNORE_INDEX  # the prompt is the teacher's text, not sampled
        return ids, labels

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        input_ids, cached = batch[0], batch[1:]
        labels = shift_labels(input_ids)
        if not cached and self.on_policy_now(self.global_step):
            input_ids, labels = self.sample_continuations(input_ids, self.global_step)
        want_hidden = self.hidden_kd is not None
        student_rows, student_states = self._rows(self.student, input_ids, want_hidden)
        teacher_rows, teacher_states = None, None
        if cached:
            teacher_rows = TopK(cached[0], cached[1])
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_rows, teacher_states = self._rows(self.teacher, input_ids, want_hidden)
        out = self.loss(student_rows, teacher_rows, labels, vocab=self.vocab_size)
        if self.hidden_kd is not None:
            out["hidden"] = self.hidden_kd(student_states, teacher_states, labels != IGNORE_INDEX)
            out["loss"] = out["loss"] + self.loss.hidden_weight * out["hidden"]
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return out["loss"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_start is not None:
            tokens = batch[0].numel()
            self.log("train/tokens_per_s", tokens / (time.perf_counter() - self._step_start))

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        input_ids = batch[0]
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

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        if self.optimizer_name == "adamw8bit":
            # bitsandbytes' blockwise 8-bit moments: ~75% less optimizer memory (CUDA only).
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # student + projections
        optimizer = self._optimizer(params)
        total = max(self.trainer.estimated_stepping_batches, 1)
        return warmup_cosine(optimizer, self.warmup_steps, total, self.min_lr_ratio)
