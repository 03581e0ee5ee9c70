"""The nano-vlm recipe: VLM teacher → prune (vision tower + LM + connector) → vision_kd (the
pruned tower learns the teacher's image tokens, images only) → KD on answer tokens (+ connector
feature KD) → int8 (PTQ, or KD-QAT) → VQA eval with retention → export."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill.models.vlm import parameter_counts, save_processor
from distill.validate import ConfigError
from distill.vlm_train import csv_logger, train_stage, vqa_eval, write_summary

log = logging.getLogger(__name__)

TEACHER_RECIPE = "python -m distill train recipe=vlm-teacher"


def _is_blind(run_dir: Path) -> bool:
    """A blind-baseline run (trained on blank images) is no teacher."""
    config = run_dir / "config.yaml"
    return config.is_file() and bool(OmegaConf.load(config).get("data", {}).get("blank_images"))


def find_teacher(cfg: DictConfig) -> Path:
    """teacher.path, else the newest `<output_root>/vlm-teacher/*/model/`; a ConfigError that
    says how to make one when there is none."""
    if cfg.teacher.get("path"):
        path = Path(cfg.teacher.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                "train",
                [
                    f"teacher.path={path}: no VLM there (no config.json). Train one with "
                    f"`{TEACHER_RECIPE}` (writes outputs/vlm-teacher/<stamp>/model/)"
                ],
            )
        return path
    runs = [
        r
        for r in sorted(Path(cfg.output_root).glob("vlm-teacher/*/model/config.json"))
        if not _is_blind(r.parent.parent)
    ]
    if not runs:
        raise ConfigError(
            "train",
            [
                f"no VLM teacher under {Path(cfg.output_root) / 'vlm-teacher'}: train it first with "
                f"`{TEACHER_RECIPE}` (about 20 min on 2 CPU cores), or point teacher.path=<dir> at "
                "an Idefics3 model directory"
            ],
        )
    return runs[-1].parent


def prune_stage(cfg, teacher, data, run_dir: Path):
    """student-init/ (HF dir + processor + prune.json) from the teacher."""
    from transformers import Idefics3ForConditionalGeneration

    from distill.prune.vlm import prune_vlm

    out = run_dir / "student-init"
    if (out / "prune.json").exists() and not cfg.force:
        log.info("prune: %s exists, skipping (force=true reruns)", out)
        return Idefics3ForConditionalGeneration.from_pretrained(out), json.loads(
            (out / "prune.json").read_text()
        )
    s = cfg.student
    loader = data.train_dataloader()
    batches = [b for _, b in zip(range(s.calibration_batches), loader, strict=False)]
    student, record = prune_vlm(
        teacher,
        batches,
        OmegaConf.to_container(s.vision),
        OmegaConf.to_container(s.lm),
        params=s.get("params"),
        search=OmegaConf.to_container(s.search) if s.get("search") else None,
    )
    student.save_pretrained(out)
    save_processor(data.processor, out)
    (out / "prune.json").write_text(json.dumps(record, indent=1))
    return student, record


def quant_stage(cfg, teacher, student, processor, run_dir: Path, feature_channels, data):
    """int8 student-qat/ (KD-QAT) or student-ptq/: compressed-tensors int8, and the in-memory
    converted model (its forward is the export's)."""
    import copy

    from distill.quant import build_scheme, finish_qat, prepare_qat, save_int8, to_int8

    q = cfg.quant
    scheme = build_scheme(q)
    model = copy.deepcopy(student)
    if q.method == "qat":
        prepare_qat(model, scheme)
        qcfg = OmegaConf.merge(
            cfg,
            {
                "trainer": {"max_steps": q.steps, "limit_val_batches": 0},
                "optim": {"lr": q.lr, "vision_lr": q.lr, "warmup_steps": q.warmup_steps},
                "force": True,
                "resume": None,
            },
        )
        qdir = run_dir / "qat"
        train_stage(qcfg, model, processor, qdir, qdir / "unused", teacher=teacher, data=data,
                    feature_kd_weight=cfg.feature_kd_weight, feature_channels=feature_channels,
                    save=False)  # fmt: skip
        finish_qat(model)
    model = to_int8(model.eval(), scheme)
    out = run_dir / ("student-qat" if q.method == "qat" else "student-ptq")
    int8_eval = copy.deepcopy(model)
    save_int8(model, out)
    save_processor(processor, out)
    return int8_eval, out


def run_student(cfg: DictConfig, run_dir: Path) -> dict:
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from eval.vqa import retention
    from eval.vqa_report import write_vqa_report

    start = time.perf_counter()
    teacher_dir = find_teacher(cfg)  # before anything heavy: a clear message, no traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    teacher = Idefics3ForConditionalGeneration.from_pretrained(teacher_dir).eval()
    teacher.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    data = instantiate(cfg.data, processor=processor, seed=cfg.seed)
    data.setup()
    stages = {"setup": time.perf_counter() - start}

    t = time.perf_counter()
    student, record = prune_stage(cfg, teacher, data, run_dir)
    stages["prune"] = time.perf_counter() - t
    channels = record["lm_channels"] if cfg.feature_kd_weight > 0 else None

    def warm_up(data):  # the pruned tower learns the teacher's image tokens first
        from distill.vision_pretrain import distill_vision

        s = time.perf_counter()
        distill_vision(student, teacher, record["lm_channels"], data, cfg.vision_kd, cfg.trainer,
                       csv_logger(run_dir, "vision_kd"))  # fmt: skip
        stages["vision_kd"] = time.perf_counter() - s

    t = time.perf_counter()
    student = train_stage(cfg, student, processor, run_dir, run_dir / "student", teacher=teacher,
                          data=data, warm_up=warm_up if cfg.get("vision_kd") else None,
                          feature_kd_weight=cfg.feature_kd_weight,
                          feature_channels=channels)  # fmt: skip
    stages["distill"] = time.perf_counter() - t - stages.get("vision_kd", 0.0)

    models = {"teacher": teacher, "student": student}
    if cfg.quant.method != "none":
        t = time.perf_counter()
        models["student_int8"], _ = quant_stage(
            cfg, teacher, student, processor, run_dir, channels, data
        )
        stages["quant"] = time.perf_counter() - t

    t = time.perf_counter()
    # the int8 student in fp32: its forward is then exactly the export's
    results, examples = vqa_eval(cfg, models, processor, fp32=("student_int8",))
    stages["eval"] = time.perf_counter() - t
    summary = {
        "run_dir": str(run_dir),
        "teacher": str(teacher_dir),
        # the int8 student has the fp32 student's parameters, one byte each
        "parameters": {
            n: parameter_counts(student if n == "student_int8" else m) for n, m in models.items()
        },  # fmt: skip
        "prune": {k: v for k, v in record.items() if "channels" not in k},
        "vqa": results,
        "retention": {n: retention(results["teacher"], r) for n, r in results.items()},
        "stage_seconds": stages,
        "examples": examples,
    }
    if cfg.get("export", True):
        from distill.export import export_stage

        t = time.perf_counter()
        serving = OmegaConf.to_container(cfg.serve, resolve=True) if cfg.get("serve") else None
        export_dir = export_stage(serving, run_dir, force=cfg.force)
        save_processor(processor, export_dir)  # the patching settings serve.images reads
        summary["export"] = str(export_dir)
        stages["export"] = time.perf_counter() - t
    write_vqa_report(summary, run_dir / "report")
    return write_summary(run_dir, summary, start)
