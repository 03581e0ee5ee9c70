"""`trainer.precision=auto`: bf16-mixed only where the CPU has a native bf16 matmul path."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.hydra_app import compose_recipe
from distill.kd_setup import build_trainer
from distill.precision import auto_precision, resolve_trainer_precision
from distill.validate import ConfigError
from distill.validate.problems import Problems
from distill.validate.training import check_trainer


def cpu_flags() -> set[str]:
    """The kernel's view of the CPU, independent of torch's own detection."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def test_auto_on_cpu_follows_the_cpu_features():
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert auto_precision("cpu") == ("bf16-mixed" if native_bf16 else "32-true")


def test_auto_is_resolved_in_the_config_and_in_the_trainer(tmp_path):
    cfg = compose_recipe(overrides=["trainer.precision=auto", "logger=none"])
    trainer = build_trainer(cfg, tmp_path)  # composed outside the app: still resolved
    assert trainer.precision == auto_precision("cpu")
    resolve_trainer_precision(cfg)
    assert cfg.trainer.precision == auto_precision("cpu")
    explicit = compose_recipe(overrides=["trainer.precision=32-true"])
    resolve_trainer_precision(explicit)
    assert explicit.trainer.precision == "32-true"


@pytest.mark.parametrize(("value", "ok"), [("auto", True), ("bf16-mixed", True), ("fp8", False)])
def test_precision_knob_is_validated(value, ok):
    p = Problems()
    check_trainer(compose_recipe(overrides=[f"trainer.precision={value}"]), p)
    if ok:
        p.raise_if_any("train")
    else:
        with pytest.raises(ConfigError, match=r"trainer\.precision.*fp8"):
            p.raise_if_any("train")
