"""`python -m distill train recipe=vlm-teacher | nano-vlm`: the vision-language pipelines.

vlm-teacher: build Idefics3 (packaged LM + fresh vision tower) → train on easy-VQA answers →
model/ → VQA eval (the trained model, and the same model shown blank images) → report/.
nano-vlm: find the teacher → prune vision tower + LM → KD on answer tokens → (int8) → eval →
export. Both print their wall time and write metrics.json; stages whose output exists are
skipped, and `resume=true` continues training from the last Lightning checkpoint.
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

from distill.kd_setup import build_trainer
from distill.models.vlm import parameter_counts, save_processor
from distill.precision import lightning_precision
from distill.rundir import checkpoint_to_resume

log = logging.getLogger(__name__)

# Parts of an Idefics3 model that `freeze` may name, as parameter-name prefixes.
PARTS = {
    "vision": ("model.vision_model.",),
    "connector": ("model.connector.",),
    "lm_embeddings": ("model.text_model.embed_tokens.", "lm_head."),
    "lm_layers": ("model.text_model.layers.",),
    "lm_norm": ("model.text_model.norm.",),
}
PARTS["lm"] = PARTS["lm_embeddings"] + PARTS["lm_layers"] + PARTS["lm_norm"]


def freeze_parts(model: torch.nn.Module, parts: list[str]) -> dict[str, int]:
    """requires_grad=False on the named parts; returns trainable / frozen parameter counts."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"freeze: unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    prefixes = tuple(p for part in parts for p in PARTS[part])
    model.requires_grad_(True)
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in unique) - trainable}


def csv_logger(run_dir: Path, name: str):
    """A CSV logger writing `<run_dir>/<name>/metrics.csv` (the warm-up stages' logs)."""
    return L.pytorch.loggers.CSVLogger(save_dir=str(run_dir), name=name, version="")


def train_stage(
    cfg,
    model,
    processor,
    run_dir: Path,
    out_dir: Path,
    teacher=None,
    save=True,
    data=None,
    warm_up=None,
    **module_kw,
):
    """Fit `model` on easy-VQA (CE, or KD from `teacher`); saves it with its processor.
    `data`: a set-up VQADataModule to reuse (default: built from cfg.data). `warm_up(data)`:
    runs before the fit (and before `cfg.freeze` applies) unless the stage is skipped or
    resumed from a checkpoint, which already holds its result."""
    from distill.vlm_module import VQAModule

    if save and (out_dir / "config.json").exists() and not cfg.force:
        log.info("train: %s exists, skipping (force=true reruns)", out_dir)
        return type(model).from_pretrained(out_dir)
    if data is None:
        data = instantiate(cfg.data, processor=processor, seed=cfg.seed)
    resume_from = checkpoint_to_resume(run_dir, cfg.resume)
    if warm_up is not None and resume_from is None:
        data.setup()
        warm_up(data)
    counts = freeze_parts(model, list(cfg.freeze))
    log.info("train: freeze %s → %s", list(cfg.freeze), counts)
    module = VQAModule(model, instantiate(cfg.loss), teacher=teacher, **cfg.optim, **module_kw)
    trainer = build_trainer(cfg, run_dir, stage="vqa")
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    model.requires_grad_(True)
    if save:
        model.save_pretrained(out_dir)
        save_processor(processor, out_dir)
    return model


def vqa_eval(
    cfg, models: dict, processor, blank: tuple[str, ...] = (), fp32: tuple[str, ...] = ()
) -> tuple[dict, list]:
    """Per-type accuracy of each model on the fixed test sample (and of `blank` models shown
    white images, as '<name> (blank image)'), with a few examples. Models run in the training
    precision, those named in `fp32` in fp32."""
    from eval.vqa import accuracy_by_type, answer_questions, easy_vqa_items

    e = cfg.eval
    items = easy_vqa_items(e.questions, e.seed)
    answers, results = {}, {}
    runs = [(n, m, False) for n, m in models.items()]
    runs += [(f"{n} (blank image)", models[n], True) for n in blank]
    trained_in = lightning_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    bf16 = trained_in.startswith("bf16")  # eval in the precision trained in
    for name, model, blank_image in runs:
        t = time.perf_counter()
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and name not in fp32):
            answers[name] = answer_questions(
                model,
                processor,
                items,
                max_new_tokens=e.max_new_tokens,
                instruction=cfg.data.instruction,
                batch_size=e.batch_size,
                blank=blank_image,
                progress=True,
            )
        results[name] = accuracy_by_type(answers[name], items)
        results[name]["seconds"] = time.perf_counter() - t
        log.info("vqa %s: %s", name, results[name]["overall"])
    examples = [
        {"image": str(i.image), "question": i.question, "answer": i.answer}
        | {n: answers[n][k] for n in answers}
        for k, i in enumerate(items[: e.examples])
    ]
    return results, examples


def write_summary(run_dir: Path, summary: dict, start: float) -> dict:
    summary["wall_seconds"] = time.perf_counter() - start
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2))
    print(f"wall time: {summary['wall_seconds'] / 60:.1f} min ({run_dir})")
    return summary


def run_teacher(cfg: DictConfig, run_dir: Path) -> dict:
    """The vlm-teacher recipe (module doc)."""
    from distill.models.vlm import build_vlm
    from eval.vqa_report import write_vqa_report

    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    t = cfg.teacher
    model, processor = build_vlm(
        t.lm, OmegaConf.to_container(t.vision), t.scale_factor, cfg.seed, t.dtype
    )
    stages = {"setup": time.perf_counter() - start}
    s = time.perf_counter()
    warm, warm_up = cfg.get("vision_pretrain"), None
    if warm and not cfg.data.get("blank_images"):  # the blind baseline has nothing to see

        def warm_up(data):
            from distill.vision_pretrain import pretrain_vision

            pretrain_vision(model, data, warm, cfg.trainer, csv_logger(run_dir, "vision_pretrain"))

    model = train_stage(cfg, model, processor, run_dir, run_dir / "model", warm_up=warm_up)
    stages["train"] = time.perf_counter() - s
    s = time.perf_counter()
    name = "blind" if cfg.data.get("blank_images") else "teacher"
    results, examples = vqa_eval(cfg, {name: model}, processor, blank=(name,))
    stages["eval"] = time.perf_counter() - s
    summary = {
        "run_dir": str(run_dir),
        "parameters": {name: parameter_counts(model)},
        "vqa": results,
        "stage_seconds": stages,
        "examples": examples,
    }
    write_vqa_report(summary, run_dir / "report")
    return write_summary(run_dir, summary, start)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.recipe_name == "nano-vlm" or cfg.get("student") is not None:
        from distill.vlm_student import run_student

        return run_student(cfg, run_dir)
    return run_teacher(cfg, run_dir)
