"""`python -m distill eval student=<dir> teacher=<id|dir> output_dir=<dir>`: evaluate a student
against its teacher and write report.{json,md,html}.

Arguments (key=value): student (required unless run_dir), teacher (default: the embedded
SmolLM2), output_dir (default: <run_dir>/report or outputs/eval/<timestamp>), int8 (an int8 /
QAT student directory, speed and quality measured too), run_dir (a training run: its student/,
student-qat/ or student-ptq/ and metrics/metrics.csv are used), device (auto), eval (preset:
full | default), logger (none | wandb), and any suite knob as eval.<knob>=<value>.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from hydra import compose, initialize_config_dir

from distill.commands.keyvalue import split_key_values
from distill.paths import configs_dir

log = logging.getLogger(__name__)

ARGS = ("student", "teacher", "output_dir", "int8", "run_dir", "device", "eval", "logger")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split key=value arguments into this command's own and the eval.* overrides for Hydra."""
    args, overrides = split_key_values(argv, ARGS, ["eval"])
    return args, overrides["eval"]


def find_run_files(args: dict[str, str]) -> dict[str, str | None]:
    """Fill student / int8 / metrics_csv / output_dir from a run dir or the student's parent."""
    run_dir = Path(args["run_dir"]) if "run_dir" in args else None
    if run_dir is not None and not run_dir.is_dir():
        raise SystemExit(f"run_dir={run_dir}: no such directory")
    student = args.get("student") or (str(run_dir / "student") if run_dir else None)
    if student is None:
        raise SystemExit("eval needs student=<dir> (or run_dir=<training run>)")
    if not (Path(student) / "config.json").exists():
        raise SystemExit(f"student={student}: not a Hugging Face model directory (no config.json)")
    parent = run_dir or Path(student).parent
    int8 = args.get("int8")
    for name in ("student-qat", "student-ptq"):  # the quant stage's int8 student, QAT first
        if int8 is None and run_dir and (run_dir / name / "config.json").exists():
            int8 = str(run_dir / name)
    csv = parent / "metrics" / "metrics.csv"
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    output_dir = args.get("output_dir") or str(
        run_dir / "report" if run_dir else Path("outputs") / "eval" / stamp
    )
    return {
        "student": student,
        "int8": int8,
        "metrics_csv": str(csv) if csv.is_file() else None,
        "output_dir": output_dir,
    }


def main(argv: list[str]) -> int:
    from distill.assets import TEACHER_NAME
    from distill.models.loading import load_tokenizer, resolve_device
    from distill.validate import check_eval_command
    from eval.models import load_int8, load_model
    from eval.suite import evaluate

    args, overrides = parse_args(argv)
    files = find_run_files(args)
    teacher_path = args.get("teacher", TEACHER_NAME)
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose(overrides=[f"+eval={args.get('eval', 'full')}", *overrides])
    settings = check_eval_command(cfg.eval, teacher_path, args.get("device", "auto"))  # no loading
    device = resolve_device(args.get("device", "auto"))
    from eval.suite import expected_seconds

    minutes = expected_seconds(settings, 2 if files["int8"] else 1) / 60
    print(
        f"eval={args.get('eval', 'full')}: {settings.blocks} blocks × {settings.seq_len} tokens, "
        f"{settings.probe_paragraphs} probe paragraphs, {settings.prompts} prompts × "
        f"{settings.new_tokens} tokens; expected about {max(minutes, 1):.0f} min for a ~135M teacher on "
        "2 CPU cores (eval=default is the quick preset)",
        flush=True,
    )

    tokenizer = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, device)
    students = {"student": load_model(files["student"], device)}
    if files["int8"]:
        students["student_int8"] = load_int8(files["int8"], device, settings.int8_kernels)
    processor = None
    if getattr(teacher.config, "vision_config", None) is not None:
        from transformers import AutoProcessor

        from distill.models.loading import resolve_model_path

        processor = AutoProcessor.from_pretrained(resolve_model_path(teacher_path)[0])
        tokenizer = processor.tokenizer  # carries the image tokens the model was built with
    wandb_run = None
    if args.get("logger", "none") == "wandb":
        import wandb

        Path(files["output_dir"]).mkdir(parents=True, exist_ok=True)
        wandb_run = wandb.init(
            project="nanodistill", dir=files["output_dir"], mode="offline", job_type="eval"
        )
    config = {
        "teacher": teacher_path,
        "student": files["student"],
        "int8": files["int8"],
        "device": device,
    }
    report = evaluate(
        settings,
        teacher,
        students,
        tokenizer,
        files["output_dir"],
        processor=processor,
        metrics_csv=files["metrics_csv"],
        config=config,
        wandb_run=wandb_run,
        model_dirs=runtime_dirs(teacher_path, files, device),
    )
    if wandb_run is not None:
        wandb_run.finish()
    from distill.summary import print_headline

    print_headline(report)
    print(f"report: {Path(files['output_dir']) / 'report.html'}")
    return 0


def runtime_dirs(teacher_path: str, files: dict, device: str) -> dict[str, str] | None:
    """Every model as a directory the serving runtime loads (speed is timed there), or None."""
    from eval.stage import _teacher_dir

    dirs = {"teacher": _teacher_dir(teacher_path), "student": files["student"]}
    if files["int8"]:
        dirs["student_int8"] = files["int8"]
    if device != "cpu" or not all(d and (Path(d) / "config.json").exists() for d in dirs.values()):
        return None
    return dirs
