"""`python -m distill train`: the whole chain, one Hydra recipe.

The stage order lives in `STAGES` below and nowhere else: prune (the student carved out of the
teacher) → cache (the teacher's top-k cache, with `build_teacher_cache: true`) → distill (KD) →
quant (PTQ baseline + KD-QAT int8, `quant=none` skips) → eval (report/) → export (the most finished student as a servable dir). Every stage writes a plain
directory under the run dir and is skipped when its output exists, so a resumed run
(`resume=true`) continues where the last one stopped. Shared KD setup: distill/kd_setup.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from distill.data.text import TextDataModule
from distill.kd_setup import build_datamodule, build_module, build_trainer
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer, resolve_device
from distill.precision import resolve_trainer_precision
from distill.rundir import checkpoint_to_resume
from distill.summary import print_comparison, print_headline
from distill.validate import check_recipe

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the stages hand each other: the loaded teacher and data, the current student and
    the held-out comparison that ends up in metrics.json."""

    cfg: DictConfig
    run_dir: Path
    teacher: torch.nn.Module
    tokenizer: object
    data: TextDataModule
    student: torch.nn.Module | None = None
    results: dict[str, dict] = field(default_factory=dict)

    def compare(self, models: dict[str, torch.nn.Module]) -> None:
        """Held-out (test split) perplexity and size of each model, into `results`."""
        from eval.perplexity import perplexity

        for name, model in models.items():
            ppl = perplexity(
                model, self.data.blocks["test"], self.cfg.eval_batch_size, desc=f"test ppl {name}"
            )
            self.results[name] = {"parameters": count_parameters(model), **ppl}


def distill_stage(cfg: DictConfig, teacher, student, data, run_dir: Path) -> torch.nn.Module:
    """KD from the frozen teacher into `student`; writes checkpoints/ and student/."""
    out_dir = run_dir / "student"
    if (out_dir / "config.json").exists() and not cfg.force:
        log.info("distill: %s exists, skipping (force=true reruns)", out_dir)
        return type(student).from_pretrained(out_dir).to(student.device)
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    module, datamodule = build_module(cfg, teacher, student, data, run_dir)
    trainer = build_trainer(cfg, run_dir, stage="distill")
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint_to_resume(run_dir, cfg.resume))
    student.requires_grad_(True)
    student.save_pretrained(out_dir)
    data.tokenizer.save_pretrained(out_dir)
    return student


def _prune(r: Run) -> None:
    from distill.prune.stage import prune_stage

    r.student = prune_stage(r.cfg.student, r.teacher, r.tokenizer, r.data, r.run_dir, r.cfg.force)
    r.compare({"teacher": r.teacher, "student (pruned only)": r.student})


def _cache(r: Run) -> None:
    """The teacher's top-k cache for `loss=topk_cached`, built in the run when it is missing
    (`build_teacher_cache: true`): the teacher is loaded anyway, and KD then trains without it."""
    from distill.commands.cache_teacher import build_cache

    if (Path(r.cfg.loss.cache) / "meta.json").is_file() and not r.cfg.force:
        log.info("cache: %s exists, reusing it", r.cfg.loss.cache)
        return
    build_cache(r.cfg, r.teacher, r.tokenizer, r.data.blocks["train"])


def _distill(r: Run) -> None:
    r.student = distill_stage(r.cfg, r.teacher, r.student, r.data, r.run_dir)
    r.compare({"student (distilled)": r.student})


def _quant(r: Run) -> None:
    from distill.quant_stage import quant_stage

    r.compare(quant_stage(r.cfg, r.teacher, r.student, r.data, r.run_dir))


def _eval(r: Run) -> None:
    from eval.stage import eval_stage  # lazy: the eval stack loads only when this stage runs

    eval_stage(r.cfg, r.teacher, r.student, r.tokenizer, r.run_dir)


def _export(r: Run) -> None:
    from distill.export import export_stage

    serving = OmegaConf.to_container(r.cfg.serve, resolve=True) if r.cfg.get("serve") else None
    export_stage(serving, r.run_dir, force=r.cfg.force, name=served_name(r.cfg, r.run_dir))


def _wanted(cfg: DictConfig, stage: str) -> bool:
    if stage == "cache":
        return bool(cfg.get("build_teacher_cache")) and bool(cfg.loss.get("cache"))
    if stage == "quant":
        return bool(cfg.get("quant")) and cfg.quant.method != "none"
    if stage == "eval":
        return cfg.get("eval") is not None
    if stage == "export":
        return bool(cfg.get("export", True))
    return True


# The pipeline, in order. Each stage reads and writes the run dir; absent config skips it.
STAGES: tuple[tuple[str, Callable[[Run], None]], ...] = (
    ("prune", _prune),
    ("cache", _cache),
    ("distill", _distill),
    ("quant", _quant),
    ("eval", _eval),
    ("export", _export),
)


def served_name(cfg: DictConfig, run_dir: Path) -> str:
    """The export's model name: `<recipe>-<run>` (e.g. nano-text-2026-11-30_15-02-11)."""
    serve_cfg = cfg.get("serve") or {}
    return serve_cfg.get("model") or f"{cfg.get('recipe_name', 'run')}-{run_dir.name}"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    resolve_trainer_precision(cfg)  # `auto` → what runs here, for every stage and the saved config
    if cfg.get("pipeline") == "vlm":  # recipes/vlm-teacher.yaml, nano-vlm.yaml
        from distill.vlm_train import run as run_vlm

        return run_vlm(cfg, run_dir)
    check_recipe(cfg, "train")  # every knob, before the teacher loads
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = resolve_device(cfg.teacher.device)

    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    teacher = load_causal_lm(
        cfg.teacher.name_or_path, cfg.teacher.dtype, device, cfg.teacher.load_in_8bit
    )
    teacher.eval().requires_grad_(False)
    r = Run(cfg, run_dir, teacher, tokenizer, build_datamodule(cfg, tokenizer, run_dir))
    stage_seconds = {"setup": time.perf_counter() - start}
    for name, stage in STAGES:
        if not _wanted(cfg, name):
            continue
        log.info("stage %s", name)
        t = time.perf_counter()
        stage(r)
        stage_seconds[name] = time.perf_counter() - t
    stage_seconds["total"] = time.perf_counter() - start
    summary = {"run_dir": str(run_dir), "models": r.results, "stage_seconds": stage_seconds}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    report = run_dir / "report" / "report.json"
    if report.is_file():
        print_headline(json.loads(report.read_text()))
    print_comparison(r.results, stage_seconds)
    return summary


def main(argv: list[str]) -> int:
    from distill.hydra_app import run_hydra_app

    return run_hydra_app(run, argv)
