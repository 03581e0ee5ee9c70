"""Silence what is not the user's business, once per process: duplicated or irrelevant
Lightning INFO lines, torchao's `_pytree` registration warnings, Lightning's LeafSpec
deprecation, wandb's banners. Only names are touched here; nothing heavy is imported."""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose INFO lines say nothing about this run ("GPU available: False", litlogger tips,
# "`Trainer.fit` stopped: `max_steps=40` reached").
_QUIET_INFO = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)


def quiet_third_party() -> None:
    """Call before the heavy imports (safe to call again after them)."""
    # torchao registers Enum subclasses with torch's pytree at import: a deprecation warning
    # per enum, in every process that imports it.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    for name in _QUIET_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")  # no stdout capture banner in offline runs


def one_lightning_handler() -> None:
    """Lightning adds its own console handler when it is imported before logging is set up;
    with Hydra's root handler every Lightning line then prints twice. Keep the root's."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    quiet_third_party()
