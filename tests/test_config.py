"""Every YAML in configs/ and recipes/ composes; components instantiate with tiny stand-ins."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from distill.hydra_app import compose_recipe
from distill.paths import configs_dir, recipes_dir

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in configs_dir().glob("*/*.yaml"))


def _compose(recipe: str, overrides: list[str] = ()):
    return compose_recipe(recipe, overrides, return_hydra_config=True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    cfg = _compose(recipe)
    assert cfg.recipe_name == recipe
    assert cfg.teacher.name_or_path and cfg.trainer._target_


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = _compose("nano-text", [f"{group}={option}"])
    assert group in cfg


def test_components_instantiate(tmp_path, tokenizer):
    cfg = _compose("nano-text", ["trainer.max_steps=1"])
    assert type(instantiate(cfg.loss)).__name__ == "KDLoss"
    trainer = instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path)
    )
    assert trainer.max_steps == 1
    data = instantiate(cfg.data, tokenizer=tokenizer, max_eval_blocks=1, max_train_blocks=2)
    data.setup()
    assert data.blocks["train"].shape == (2, cfg.data.seq_len)
    from distill.trackers import build_loggers

    for logger in ("wandb", "csv", "none"):
        loggers = build_loggers(_compose("nano-text", [f"logger={logger}"]).logger, Path(tmp_path))
        assert len(loggers) == {"wandb": 2, "csv": 1, "none": 0}[logger]


def test_installed_package_finds_configs_and_recipes(tmp_path):
    """A non-editable install (no checkout beside it) still finds the Hydra config tree."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(root),
        ],
        check=True,
    )
    code = (
        "from distill.paths import configs_dir, recipes_dir; "
        "print(configs_dir()); print(recipes_dir())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(target / "distill" / "_configs"), str(target / "distill" / "_recipes")]
    assert (Path(out[0]) / "teacher" / "smollm2-135m.yaml").exists()
    assert (Path(out[1]) / "nano-text.yaml").exists()
