"""`python -m distill train`: teacher → prune → distill → (int8) → eval → export, one Hydra recipe.

Read top to bottom: setup (teacher, tokenizer, data) → prune stage → distill stage → held-out
comparison → quant stage (quant=ptq-int8|qat-int8) → eval stage (report/) → export stage.
Every stage writes a plain directory under the run dir and is skipped when its output exists,
so a resumed run (`resume=true`) continues where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill.data.teacher_cache import CachedTrainData
from distill.data.text import TextDataModule
from distill.hidden_kd import kept_layers_from, layer_pairs
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer, resolve_device
from distill.module import DistillModule, output_rows
from distill.prune.stage import prune_stage
from distill.rundir import checkpoint_to_resume
from distill.summary import print_comparison
from distill.trackers import build_loggers
from distill.validate import check_recipe
from distill.vocab import shared_vocab_size

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, tokenizer, run_dir: Path) -> TextDataModule:
    data = instantiate(
        cfg.data, tokenizer=tokenizer, seed=cfg.seed, split_record=str(run_dir / "data_split.json")
    )
    data.setup()
    return data


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
    )
    callbacks = [checkpoint, L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")]
    loggers = build_loggers(cfg.logger, run_dir)
    if not loggers:
        callbacks.pop()  # LearningRateMonitor needs a logger; lr is still in the progress bar
    return instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks
    )


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


def distill_stage(
    cfg: DictConfig, teacher, student, data: TextDataModule, run_dir: Path
) -> torch.nn.Module:
    """KD from the frozen teacher into `student`; writes checkpoints/ and student/."""
    out_dir = run_dir / "student"
    if (out_dir / "config.json").exists() and not cfg.force:
        log.info("distill: %s exists, skipping (force=true reruns)", out_dir)
        return type(student).from_pretrained(out_dir).to(student.device)
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    module, datamodule = build_module(cfg, teacher, student, data, run_dir)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint_to_resume(run_dir, cfg.resume))
    student.requires_grad_(True)
    student.save_pretrained(out_dir)
    data.tokenizer.save_pretrained(out_dir)
    return student


def compare(
    models: dict[str, torch.nn.Module], data: TextDataModule, batch_size: int
) -> dict[str, dict]:
    """Held-out (test split) perplexity and size of each model."""
    from eval.perplexity import perplexity

    results = {}
    for name, model in models.items():
        ppl = perplexity(model, data.blocks["test"], batch_size=batch_size, desc=f"test ppl {name}")
        results[name] = {"parameters": count_parameters(model), **ppl}
    return results


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.get("pipeline") == "vlm":  # recipes/vlm-teacher.yaml, nano-vlm.yaml
        from distill.vlm_train import run as run_vlm

        return run_vlm(cfg, run_dir)
    check_recipe(cfg, "train")  # every knob, before the teacher loads
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    device = resolve_device(cfg.teacher.device)

    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    teacher = load_causal_lm(
        cfg.teacher.name_or_path, cfg.teacher.dtype, device, cfg.teacher.load_in_8bit
    )
    teacher.eval().requires_grad_(False)
    data = build_datamodule(cfg, tokenizer, run_dir)
    stage_seconds = {"setup": time.perf_counter() - start}

    t = time.perf_counter()
    student = prune_stage(cfg.student, teacher, tokenizer, data, run_dir, force=cfg.force)
    stage_seconds["prune"] = time.perf_counter() - t
    pruned_only = compare({"student (pruned only)": student}, data, cfg.eval_batch_size)

    t = time.perf_counter()
    student = distill_stage(cfg, teacher, student, data, run_dir)
    stage_seconds["distill"] = time.perf_counter() - t

    results = compare({"teacher": teacher}, data, cfg.eval_batch_size) | pruned_only
    results |= compare({"student (distilled)": student}, data, cfg.eval_batch_size)

    if cfg.get("quant") and cfg.quant.method != "none":  # quant=ptq-int8 | qat-int8
        from distill.quant_stage import quant_stage

        t = time.perf_counter()
        results |= compare(
            quant_stage(cfg, teacher, student, data, run_dir), data, cfg.eval_batch_size
        )
        stage_seconds["quant"] = time.perf_counter() - t

    t = time.perf_counter()
    from eval.stage import eval_stage  # lazy: the eval stack loads only when this stage runs

    eval_stage(cfg, teacher, student, tokenizer, run_dir)
    stage_seconds["eval"] = time.perf_counter() - t
    if cfg.get("export", True):
        from distill.export import export_stage

        t = time.perf_counter()
        serving = OmegaConf.to_container(cfg.serve, resolve=True) if cfg.get("serve") else None
        export_stage(serving, run_dir, force=cfg.force)
        stage_seconds["export"] = time.perf_counter() - t
    stage_seconds["total"] = time.perf_counter() - start
    summary = {"run_dir": str(run_dir), "models": results, "stage_seconds": stage_seconds}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    print_comparison(results, stage_seconds)
    return summary


def main(argv: list[str]) -> int:
    from distill.hydra_app import run_hydra_app

    return run_hydra_app(run, argv)
