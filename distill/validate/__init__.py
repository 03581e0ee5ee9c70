"""Every knob checked before the first expensive step (model load, calibration, training).

One entry per kind of command: `check_recipe(cfg, command)` for the Hydra commands (`train`,
`prune`, `cache-teacher`; each checks the config groups it uses), `check_eval_command` and
`check_export` for the key=value ones. A problem names the knob, its value and what is
allowed (`loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)`);
all problems are reported together in one `ConfigError`. Checks that depend on the teacher's
shape (vocabulary, context length, dims) read only its config, never its weights.

Layout: problems.py (ConfigError, the line format), shape.py (a model's shape from its
config), training.py (teacher, data, loss, student, optim, trainer), stages.py (quant,
serving, eval).
"""

from __future__ import annotations

from distill.validate.problems import ConfigError, Problems, cuda_available
from distill.validate.shape import ModelShape, model_shape
from distill.validate.stages import (
    check_eval_settings,
    check_int8_scheme,
    check_quant,
    check_serving,
)
from distill.validate.training import (
    DEVICES,
    check_data,
    check_loss,
    check_optim,
    check_student,
    check_teacher,
    check_trainer,
)

__all__ = ["ConfigError", "ModelShape", "check_eval_command", "check_export", "check_recipe"]

COMMANDS = ("train", "prune", "cache-teacher")


def check_recipe(cfg, command: str) -> ModelShape | None:
    """Raise ConfigError listing every bad knob `command` would use; returns the teacher's shape.

    Reads only configs (the teacher's config.json, a teacher cache's meta.json): run it first.
    """
    if command not in COMMANDS:
        raise ValueError(f"check_recipe: unknown command {command!r}; one of {COMMANDS}")
    p = Problems()
    p.integer("seed", cfg.get("seed", 0), 0)
    shape = check_teacher(cfg, p)
    check_data(cfg, p, shape)
    if command == "cache-teacher":
        p.integer("eval_batch_size", cfg.get("eval_batch_size"), 1)
        check_loss(cfg, p, shape, command)
    else:
        check_student(cfg, p, shape)
    if command == "train":
        p.integer("eval_batch_size", cfg.get("eval_batch_size"), 1)
        p.integer("checkpoint_every_n_steps", cfg.get("checkpoint_every_n_steps", 10), 1)
        for flag in ("force", "export"):
            p.boolean(flag, cfg.get(flag, False))
        check_loss(cfg, p, shape, command)
        check_optim(cfg, p)
        check_trainer(cfg, p)
        check_quant(cfg, p)
        if cfg.get("eval") is not None:
            _check_eval_group(cfg.eval, p, shape.context if shape else None)
        if cfg.get("serve") is not None:
            check_serving(cfg.serve, p)
    p.raise_if_any(command)
    return shape


def _check_eval_group(eval_cfg, p: Problems, context: int | None):
    """The EvalSettings built from an `eval` config (None, with a problem, when it refuses)."""
    from hydra.utils import instantiate

    try:
        settings = instantiate(eval_cfg, _convert_="all")
    except Exception as e:  # noqa: BLE001 — EvalSettings' own checks, or a bad type
        p.lines.append(f"eval: {getattr(e, '__cause__', None) or e}")
        return None
    check_eval_settings(settings, p, context)
    return settings


def check_eval_command(eval_cfg, teacher: str, device: str):
    """`python -m distill eval`: the suite's knobs (configs/eval) against the teacher's shape,
    before loading; returns the EvalSettings."""
    p = Problems()
    if not isinstance(device, str) or not DEVICES.match(device):
        p.add("device", device, "must be auto, cpu, mps, cuda or cuda:<index>")
    elif device.startswith("cuda") and not cuda_available():
        p.add("device", device, "needs CUDA, and none is available (use auto or cpu)")
    shape = model_shape("teacher", teacher, p)
    settings = _check_eval_group(eval_cfg, p, shape.context if shape else None)
    p.raise_if_any("eval")
    return settings


def check_export(quant: str, scheme, serving) -> None:
    """`python -m distill export`: quant choice, int8 scheme and serving.json knobs."""
    from distill.export import QUANT_CHOICES

    p = Problems()
    p.choice("quant", quant, QUANT_CHOICES)
    check_int8_scheme(scheme, p)
    check_serving(serving, p, prefix="serving")
    p.raise_if_any("export")
