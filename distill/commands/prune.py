"""`python -m distill prune`: carve the student out of the teacher, no training.

Same recipes and config groups as `train` (`student=minitron-half`, `student.params=0.4`,
`student.hidden_size=448`, …); writes `<run_dir>/student-init/` (an HF checkpoint of the
teacher's class), `prune.json`, `search.json` (budget targets) and `importance.pt`. Re-prune
to another target from the same scores, with no calibration pass:
`python -m distill prune student.params=0.4 student.importance_path=<run_dir>/importance.pt`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from distill.hydra_app import run_hydra_app
from distill.kd_setup import build_datamodule
from distill.models.loading import load_causal_lm, load_tokenizer, resolve_device
from distill.prune.plan import Dims
from distill.prune.stage import prune_stage
from distill.validate import check_recipe

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Load the teacher and the calibration text, prune, and return the stage's prune.json."""
    check_recipe(cfg, "prune")  # every knob, before the teacher loads and calibrates
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.data.get("max_train_blocks") is None:
        # Only the calibration blocks are read; packing stops there (same first blocks).
        cfg.data.max_train_blocks = cfg.student.calibration_blocks
    device = resolve_device(cfg.teacher.device)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    teacher = load_causal_lm(cfg.teacher.name_or_path, cfg.teacher.dtype, device)
    teacher.eval().requires_grad_(False)
    data = build_datamodule(cfg, tokenizer, run_dir)
    prune_stage(cfg.student, teacher, tokenizer, data, run_dir, force=cfg.force)
    record_path = run_dir / "student-init" / "prune.json"
    if not record_path.exists():  # init=pretrained: nothing was pruned
        log.info("prune: student.init=%s, nothing pruned", cfg.student.init)
        return {}
    record = json.loads(record_path.read_text())
    rows = {
        "teacher": (asdict(Dims.of(teacher.config)), record["teacher_parameters"]),
        "student": (record["dims"], record["student_parameters"]),
    }
    table = Table(title=f"pruned student → {run_dir / 'student-init'}")
    for column in ("model", "layers", "hidden", "ffn", "heads/kv", "parameters", "fraction"):
        table.add_column(column, justify="right")
    for name, (dims, params) in rows.items():
        table.add_row(
            name,
            str(dims["num_hidden_layers"]),
            str(dims["hidden_size"]),
            str(dims["intermediate_size"]),
            f"{dims['num_attention_heads']}/{dims['num_key_value_heads']}",
            f"{params:,}",
            f"{params / record['teacher_parameters']:.3f}",
        )
    Console().print(table)
    return record


def main(argv: list[str]) -> int:
    return run_hydra_app(run, argv)
