"""The prune stage: student-init/ (HF checkpoint) + importance.pt from the teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distill.models.loading import count_parameters, load_causal_lm
from distill.prune.depth import drop_layers, layers_to_keep
from distill.prune.importance import cached_scores, layer_importance

log = logging.getLogger(__name__)


def calibration_batches(
    blocks: torch.Tensor, num_blocks: int, batch_size: int
) -> list[torch.Tensor]:
    """The first `num_blocks` training blocks, batched (deterministic, no held-out text)."""
    chosen = blocks[:num_blocks]
    return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]


def prune_stage(
    cfg: DictConfig, teacher: nn.Module, tokenizer, data, run_dir: Path, force: bool = False
) -> nn.Module:
    """Derive the student: depth-prune the teacher (or use a given / random-init student)."""
    out_dir = run_dir / "student-init"
    device = next(teacher.parameters()).device
    if (out_dir / "config.json").exists() and not force:
        log.info("prune: %s exists, skipping (force=true reruns)", out_dir)
        return load_causal_lm(str(out_dir), device=str(device))
    if cfg.init == "pretrained":
        return load_causal_lm(cfg.name_or_path, device=str(device))

    scores = cached_scores(
        run_dir / "importance.pt",
        lambda: {
            "layers": layer_importance(
                teacher,
                calibration_batches(
                    data.blocks["train"], cfg.calibration_blocks, cfg.calibration_batch_size
                ),
            )
        },
    )
    keep = layers_to_keep(scores["layers"], cfg.num_hidden_layers)
    student = drop_layers(teacher, keep)
    if cfg.init == "random":  # baseline: same shape, no teacher weights
        student = type(student)(student.config).to(device)
    elif cfg.init != "prune":
        raise ValueError(f"student.init must be prune, random or pretrained, got '{cfg.init}'")
    record = {
        "init": cfg.init,
        "kept_layers": keep,
        "layer_importance": scores["layers"].tolist(),
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
    }
    log.info(
        "prune: keeping layers %s (%d → %d parameters)",
        keep,
        record["teacher_parameters"],
        record["student_parameters"],
    )
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "prune.json").write_text(json.dumps(record, indent=2))
    return student
