"""Offline-first defaults: no hub or tracking server is reachable on the machines we target."""

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_defaults() -> None:
    """Set offline env vars unless the user configured them (their values always win)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
