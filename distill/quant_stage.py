"""The quantization stage of `python -m distill train` (after distillation): PTQ or KD-QAT.

`quant=ptq-int8` rounds the distilled student to the int8 scheme (no training); `quant=qat-int8`
first trains it with torchao fake quantization and the same KD loss against the full-precision
teacher (the LLM-QAT recipe), then converts. Either writes a compressed-tensors INT8 HF
checkpoint to `student-qat/` (`student-ptq/` for PTQ), loadable by transformers.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from distill.kd_setup import build_module, build_trainer
from distill.quant import build_scheme, finish_qat, prepare_qat, save_int8, to_int8

log = logging.getLogger(__name__)

OUTPUT_DIRS = {"qat": "student-qat", "ptq": "student-ptq"}


def qat_train(cfg: DictConfig, teacher, student: torch.nn.Module, data, run_dir: Path) -> None:
    """KD with fake-quantized student modules for `cfg.quant.steps` steps (in place)."""
    qcfg = cfg.quant
    names = prepare_qat(student, build_scheme(qcfg))
    log.info("qat: %d fake-quantized modules, %d steps at lr %.2g", len(names), qcfg.steps, qcfg.lr)
    if cfg.student.get("freeze_embeddings", False):
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    qat_cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(qat_cfg, False)
    qat_cfg.optim.lr, qat_cfg.optim.warmup_steps = qcfg.lr, qcfg.warmup_steps
    module, datamodule = build_module(qat_cfg, teacher, student, data, run_dir)
    trainer = build_trainer(
        qat_cfg,
        run_dir / "qat",
        stage="qat",
        max_steps=qcfg.steps,
        limit_val_batches=0,  # held-out numbers come from the comparison after conversion
        logger=L.pytorch.loggers.CSVLogger(str(run_dir), name="metrics-qat", version=""),
        enable_checkpointing=False,
        enable_model_summary=False,  # the distill stage printed the same student's
        callbacks=[],
    )
    trainer.fit(module, datamodule=datamodule)
    student.requires_grad_(True)
    finish_qat(student)


def quant_stage(
    cfg: DictConfig, teacher, student: torch.nn.Module, data, run_dir: Path
) -> dict[str, torch.nn.Module]:
    """PTQ, or PTQ and QAT, per `cfg.quant.method`; returns {label: in-memory int8 model}.

    QAT is always reported next to the PTQ baseline (cheap: no training). The distilled
    `student` is left untouched (the stage works on copies).
    """
    method = cfg.quant.method
    if method not in ("none", *OUTPUT_DIRS):
        raise ValueError(f"quant.method must be none|ptq|qat, got {method!r}")
    methods = {"none": [], "ptq": ["ptq"], "qat": ["ptq", "qat"]}[method]
    return {
        f"student ({m} int8)": _quantize(cfg, m, teacher, student, data, run_dir) for m in methods
    }


def _quantize(cfg: DictConfig, method: str, teacher, student, data, run_dir: Path):
    out_dir = run_dir / OUTPUT_DIRS[method]
    if (out_dir / "config.json").exists() and not cfg.force:
        log.info("quant: %s exists, skipping (force=true reruns)", out_dir)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(out_dir).eval()
    model = copy.deepcopy(student)
    if method == "qat":
        qat_train(cfg, teacher, model, data, run_dir)
    model = to_int8(model.eval(), build_scheme(cfg.quant))
    save_int8(copy.deepcopy(model), out_dir)
    data.tokenizer.save_pretrained(out_dir)
    return model
