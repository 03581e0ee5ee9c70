"""Shared KD setup, called by the distill stage (distill/train.py) and the QAT stage
(distill/quant_stage.py): datamodule, Lightning trainer, the DistillModule with its checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from distill.data.teacher_cache import CachedTrainData
from distill.data.text import TextDataModule
from distill.hidden_kd import kept_layers_from, layer_pairs
from distill.models.loading import load_tokenizer
from distill.module import DistillModule, output_rows
from distill.precision import AUTO, lightning_precision
from distill.progress import progress_callbacks
from distill.quiet import one_lightning_handler
from distill.trackers import build_loggers
from distill.vocab import shared_vocab_size


def build_datamodule(cfg: DictConfig, tokenizer, run_dir: Path) -> TextDataModule:
    data = instantiate(
        cfg.data, tokenizer=tokenizer, seed=cfg.seed, split_record=str(run_dir / "data_split.json")
    )
    data.setup()
    return data


def build_trainer(cfg: DictConfig, run_dir: Path, stage: str = "distill", **overrides) -> L.Trainer:
    """The recipe's Lightning trainer for one training stage.

    `overrides` replace trainer config keys (the QAT stage: max_steps, no validation, its own
    logger and no checkpoints); a progress line every few steps is added when stdout is not a
    terminal (a log file gets step, loss, tokens/s and ETA).
    """
    if "callbacks" in overrides:
        callbacks = list(overrides.pop("callbacks"))
    else:
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
        )
        callbacks = [checkpoint, L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")]
    if "logger" not in overrides:
        loggers = build_loggers(cfg.logger, run_dir)
        if not loggers:
            callbacks = [
                c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
            ]
        overrides["logger"] = loggers or False
    one_lightning_handler()
    if str(cfg.trainer.get("precision")) == AUTO:  # configs composed outside the Hydra app
        precision = lightning_precision(AUTO, cfg.trainer.get("accelerator", "auto"))
        overrides.setdefault("precision", precision)
    max_steps = overrides.get("max_steps", cfg.trainer.get("max_steps"))
    callbacks += progress_callbacks(stage, max_steps)
    return instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, **overrides)


def build_module(cfg: DictConfig, teacher, student, data: TextDataModule, run_dir: Path):
    """The DistillModule and the datamodule it trains on (live teacher, or its top-k cache).

    Vocabularies are checked here, before any training: logit KD across tokenizers is an error.
    """
    loss = instantiate(cfg.loss)
    student_tokenizer = (
        load_tokenizer(cfg.student.name_or_path)
        if cfg.student.init == "pretrained"
        else data.tokenizer
    )
    vocab = shared_vocab_size(
        data.tokenizer, student_tokenizer, output_rows(teacher), output_rows(student)
    )
    pairs = None
    if loss.hidden_weight > 0:
        kept = kept_layers_from(run_dir / "student-init")
        pairs = layer_pairs(
            student.config.num_hidden_layers, teacher.config.num_hidden_layers, kept
        )
    datamodule = data
    if loss.cache:  # offline teacher: no teacher in the training loop
        datamodule = CachedTrainData(data, loss.cache, loss.temperature)
        teacher = None
    module = DistillModule(
        student,
        teacher,
        loss=loss,
        vocab_size=vocab,
        hidden_pairs=pairs,
        seed=cfg.seed,
        **cfg.optim,
    )
    return module, datamodule
