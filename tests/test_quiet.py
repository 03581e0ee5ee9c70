"""What is not the user's business stays out of a run's output (issue 13's noise list)."""

from __future__ import annotations

import subprocess
import sys


def test_wandb_logger_does_not_pass_the_deprecated_anonymous_setting(tmp_path):
    from omegaconf import OmegaConf

    from distill.paths import configs_dir
    from distill.trackers import build_loggers

    cfg = OmegaConf.load(configs_dir() / "logger" / "wandb.yaml")
    wandb_logger = build_loggers(cfg, tmp_path)[0]
    assert type(wandb_logger).__name__ == "WandbLogger"
    assert "anonymous" not in wandb_logger._wandb_init  # wandb warns whenever it is passed


def test_importing_the_training_stack_prints_nothing():
    """torchao registers enums with torch's pytree at import (one warning line each)."""
    code = (
        "from distill.quiet import quiet_third_party; quiet_third_party(); "
        "import torchao, distill.kd_setup, distill.quant"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "_pytree" not in result.stderr and result.stdout == ""
