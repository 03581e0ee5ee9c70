"""The prune stage: student-init/ (HF checkpoint) + importance.pt from the teacher.

Targets come from the `student` config group: explicit dims (`num_hidden_layers`,
`hidden_size`, `intermediate_size`, `num_attention_heads`, `num_key_value_heads`; unset ones
stay the teacher's) or a parameter budget `params` (fraction of the teacher), searched over
shapes with the set dims pinned. Scores come from one calibration pass, cached on disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.models.loading import count_parameters, load_causal_lm
from distill.prune.importance import cached_scores, calibration_scores
from distill.prune.plan import DIM_NAMES, Dims, head_dim_of, make_plan, retained_importance
from distill.prune.search import SearchSpace, print_candidates, search_shape
from distill.prune.slicing import slice_model

log = logging.getLogger(__name__)


def calibration_batches(
    blocks: torch.Tensor, num_blocks: int, batch_size: int
) -> list[torch.Tensor]:
    """The first `num_blocks` training blocks, batched (deterministic, no held-out text)."""
    chosen = blocks[:num_blocks]
    return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]


def importance_scores(cfg: DictConfig, teacher: nn.Module, train_blocks, path: Path) -> dict:
    """Calibration scores for `teacher`, from `path` when cached for the same settings."""
    meta = {
        "teacher": str(getattr(teacher.config, "_name_or_path", "")),
        "calibration_blocks": int(min(cfg.calibration_blocks, len(train_blocks))),
        "seq_len": int(train_blocks.shape[-1]),
    }
    batches = calibration_batches(train_blocks, cfg.calibration_blocks, cfg.calibration_batch_size)
    return cached_scores(path, lambda: calibration_scores(teacher, batches), meta)


def choose_dims(cfg: DictConfig, teacher: nn.Module, scores: dict, out_dir: Path) -> Dims:
    """The student's shape: the explicit dims, or the budget search's pick (dims pinned)."""
    pinned = {name: int(cfg[name]) for name in DIM_NAMES if cfg.get(name)}
    budget = cfg.get("params")
    if budget is None:
        if not pinned:
            raise ValueError(
                "student: set a parameter budget (student.params=0.5) or at least one target dim "
                f"({', '.join(DIM_NAMES)})"
            )
        return Dims.of(teacher.config).replace(**pinned)
    search = cfg.get("search")  # absent from student=depth: the defaults
    space = SearchSpace.from_dict(
        OmegaConf.to_container(search, resolve=True) if search is not None else {}
    )
    chosen, candidates = search_shape(teacher, scores, float(budget), space, pinned)
    print_candidates(candidates, float(budget))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search.json").write_text(
        json.dumps(
            {
                "target_fraction": float(budget),
                "search": asdict(space),
                "pinned": pinned,
                "chosen": asdict(chosen.dims),
                "candidates": [asdict(c.dims) | {"parameters": c.parameters} for c in candidates],
            },
            indent=1,
        )
    )
    return chosen.dims


def prune_stage(
    cfg: DictConfig, teacher: nn.Module, tokenizer, data, run_dir: Path, force: bool = False
) -> nn.Module:
    """Derive the student: prune the teacher to the target (or use a given / random-init one)."""
    out_dir = run_dir / "student-init"
    device = next(teacher.parameters()).device
    if (out_dir / "config.json").exists() and not force:
        log.info("prune: %s exists, skipping (force=true reruns)", out_dir)
        return load_causal_lm(str(out_dir), device=str(device))
    if cfg.init == "pretrained":
        return load_causal_lm(cfg.name_or_path, device=str(device))
    if cfg.init not in ("prune", "random"):
        raise ValueError(f"student.init must be prune, random or pretrained, got '{cfg.init}'")

    cache = Path(cfg.get("importance_path") or run_dir / "importance.pt")
    scores = importance_scores(cfg, teacher, data.blocks["train"], cache)
    dims = choose_dims(cfg, teacher, scores, out_dir)
    plan = make_plan(scores, Dims.of(teacher.config), dims, head_dim_of(teacher.config))
    student = slice_model(teacher, plan)
    if cfg.init == "random":  # baseline: same shape, no teacher weights
        student = type(student)(student.config).to(device)
    record = {
        "init": cfg.init,
        "dims": asdict(dims),
        "kept_layers": plan.layers,
        "layer_importance": scores["layers"].tolist(),
        "retained_importance": retained_importance(scores, plan),
        "importance_cache": str(cache),
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
    }
    record["fraction"] = record["student_parameters"] / record["teacher_parameters"]
    log.info(
        "prune: %s, layers %s (%d → %d parameters, %.3f)",
        asdict(dims),
        plan.layers,
        record["teacher_parameters"],
        record["student_parameters"],
        record["fraction"],
    )
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "prune.json").write_text(json.dumps(record, indent=2))
    return student
