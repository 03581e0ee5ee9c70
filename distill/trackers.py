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
    loggers = [
        instantiate(spec, save_dir=str(run_dir)) for spec in logger_cfg.values() if spec is not None
    ]
    for logger in loggers:
        # Lightning always passes anonymous=None to wandb.init, and wandb ≥ 0.2x warns that the
        # setting "has no effect" whenever it is passed at all: leave it unset.
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
    return loggers
