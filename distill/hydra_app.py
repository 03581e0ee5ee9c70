"""The one way commands enter Hydra: recipe selection, config search path, run directory.

`train`, `prune` and `cache-teacher` run as Hydra apps over the same recipes; tests, benches
and notebooks compose the same configs without an app.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distill.paths import configs_dir, recipes_dir
from distill.precision import resolve_trainer_precision
from distill.rundir import register_resolvers
from distill.validate import ConfigError

DEFAULT_RECIPE = "nano-text"


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """`recipe=<name>` picks the primary config; configs/ joins the search path."""
    flags, overrides, name = [], [], DEFAULT_RECIPE
    for arg in argv:
        if arg.startswith("recipe="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            flags.append(arg)  # argparse wants flags (-m, --cfg job) before the overrides
        else:
            overrides.append(arg)
    return [
        *flags,
        f"--config-name={name}",
        f"hydra.searchpath=[file://{configs_dir()}]",
        *overrides,
    ]


def run_hydra_app(task: Callable[[DictConfig, Path], object], argv: Sequence[str]) -> int:
    """Run `task(cfg, run_dir)` as a Hydra app (overrides, `-m` multirun, run dir) over `argv`."""
    register_resolvers()
    sys.argv = [sys.argv[0], *hydra_argv(argv)]

    @hydra.main(config_path=str(recipes_dir()), config_name=DEFAULT_RECIPE, version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        try:
            resolve_trainer_precision(cfg)
            task(cfg, Path(HydraConfig.get().runtime.output_dir))
        except ConfigError as e:  # the knobs at fault, without a traceback
            raise SystemExit(f"error: {e}") from e

    _app()
    return 0


def compose_recipe(
    recipe: str = DEFAULT_RECIPE, overrides: Sequence[str] = (), return_hydra_config: bool = False
) -> DictConfig:
    """A recipe composed with the same search path and resolvers as the CLI, outside any app."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return compose(
            recipe,
            overrides=[f"hydra.searchpath=[file://{configs_dir()}]", *overrides],
            return_hydra_config=return_hydra_config,
        )
