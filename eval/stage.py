"""The eval stage of a training run: <run_dir>/report/report.{json,md,html} for the student just
trained (and <run_dir>/student-qat/ when a QAT stage wrote one), against the same teacher."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)


def _wandb_run(cfg: DictConfig, run_dir: Path):
    """The training run's wandb run when the logger config has wandb (reopened if finished)."""
    spec = (cfg.get("logger") or {}).get("wandb")
    if not spec:
        return None
    import wandb

    if wandb.run is not None:
        return wandb.run
    return wandb.init(
        project=spec.get("project", "nanodistill"),
        dir=str(run_dir),
        mode="offline" if spec.get("offline", True) else "online",
        job_type="eval",
    )


def eval_stage(
    cfg: DictConfig, teacher: nn.Module, student: nn.Module, tokenizer, run_dir: Path
) -> dict | None:
    """Evaluate `student` (and the int8 student if present) against `teacher`; None when the
    recipe has no `eval` group. Skipped when the report exists, unless cfg.force."""
    if cfg.get("eval") is None:
        return None
    out_dir = run_dir / "report"
    if (out_dir / "report.json").exists() and not cfg.get("force", False):
        log.info("eval: %s exists, skipping (force=true reruns)", out_dir)
        return None
    from eval.suite import evaluate

    settings = instantiate(cfg.eval, _convert_="all")
    # Held-out text from exactly the split training used; perplexity on exactly the test
    # blocks metrics.json scores (data.seq_len × data.max_eval_blocks), so a model has one
    # perplexity in the run.
    data = cfg.get("data") or {}
    if data.get("seq_len") and data.get("max_eval_blocks"):
        settings.seq_len, settings.blocks = int(data.seq_len), int(data.max_eval_blocks)
    for key in ("source", "validation_fraction", "test_fraction", "hf"):
        if key in data:
            value = data[key]
            setattr(
                settings,
                key,
                OmegaConf.to_container(value) if isinstance(value, DictConfig) else value,
            )
    students = {"student": student}
    device = str(next(student.parameters()).device)
    # speed is timed on the serving runtime, which loads every model from its directory
    dirs = {"teacher": _teacher_dir(cfg.teacher.name_or_path), "student": run_dir / "student"}
    # the quant stage's int8 student: QAT's, else PTQ's
    int8_dirs = [run_dir / d for d in ("student-qat", "student-ptq")]
    qat_dir = next((d for d in int8_dirs if (d / "config.json").exists()), None)
    if qat_dir is not None:
        dirs["student_int8"] = qat_dir
    on_runtime = device == "cpu" and all(
        d and (Path(d) / "config.json").exists() for d in dirs.values()
    )
    if qat_dir is not None:
        from eval.models import load_int8

        # Quality on transformers' reference int8 numerics (the perplexity metrics.json
        # reports for this model); with the runtime timing speed, fbgemm kernels are not
        # needed here.
        kernels = settings.int8_kernels and not on_runtime
        students["student_int8"] = load_int8(str(qat_dir), device, kernels)
    return evaluate(
        settings,
        teacher,
        students,
        tokenizer,
        out_dir,
        metrics_csv=run_dir / "metrics" / "metrics.csv",
        config={"run_dir": str(run_dir), "teacher": cfg.teacher.name_or_path},
        wandb_run=_wandb_run(cfg, run_dir),
        model_dirs={k: str(v) for k, v in dirs.items()} if on_runtime else None,
    )


def _teacher_dir(name_or_path: str) -> str | None:
    """The teacher's HF directory (None for a GGUF file or a hub id)."""
    from distill.models.loading import resolve_model_path

    try:
        path, gguf = resolve_model_path(name_or_path)
    except FileNotFoundError:
        return None
    return None if gguf or not Path(path).is_dir() else path
