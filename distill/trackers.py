"""Experiment trackers (Lightning loggers) from the `logger` config group."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig


def build_loggers(logger_cfg: DictConfig | None, run_dir: Path) -> list:
    """One Lightning logger per entry of `logger` (e.g. wandb + csv); empty for `logger=none`."""
    if not logger_cfg:
        return []
    run_dir.mkdir(parents=True, exist_ok=True)
    return [
        instantiate(spec, save_dir=str(run_dir)) for spec in logger_cfg.values() if spec is not None
    ]
