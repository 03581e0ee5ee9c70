"""`trainer.precision=auto`: the fastest precision this machine trains correctly in.

bf16 autocast pays only where the hardware has a bf16 matmul path. On a CPU with AVX512-BF16 or
AMX, bf16 matmul measured 2.2× fp32 (372 vs 169 GFLOP/s on 2 threads); on an AVX2-only CPU it
is emulated and ~400× slower than fp32 — so the choice is made from the CPU's features at run
time, never fixed in a recipe. CUDA: bf16-mixed where the device supports bf16, else 16-mixed.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

AUTO = "auto"


def cpu_has_fast_bf16() -> bool:
    """A native bf16 matmul path: AVX512-BF16 or AMX tiles."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _uses_cuda(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def auto_precision(accelerator: str = "auto") -> str:
    """The Lightning precision string `auto` stands for on this machine and accelerator."""
    if _uses_cuda(str(accelerator)):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def lightning_precision(precision, accelerator: str = "auto") -> str:
    """`precision` as Lightning takes it: `auto` replaced by this machine's choice."""
    return auto_precision(str(accelerator)) if str(precision) == AUTO else str(precision)


def resolve_trainer_precision(cfg: DictConfig) -> None:
    """Replace `trainer.precision: auto` in `cfg` by the concrete choice (logged), so the saved
    config.yaml and every reader see what actually ran."""
    trainer = cfg.get("trainer")
    if trainer is None or str(trainer.get("precision")) != AUTO:
        return
    chosen = auto_precision(trainer.get("accelerator", "auto"))
    with open_dict(trainer):
        trainer.precision = chosen
    log.info("trainer.precision=auto → %s (%s)", chosen, _reason(trainer.get("accelerator")))


def _reason(accelerator) -> str:
    if _uses_cuda(str(accelerator or "auto")):
        return f"CUDA device {torch.cuda.get_device_name()}"
    if cpu_has_fast_bf16():
        return "the CPU has a native bf16 matmul path"
    return "the CPU has no native bf16 matmul path (bf16 would be emulated)"
