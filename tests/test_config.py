"""Every YAML in configs/ and recipes/ composes; components instantiate with tiny stand-ins."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from distill.hydra_app import compose_recipe
from distill.paths import configs_dir, recipes_dir
from distill.precision import resolve_trainer_precision

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in configs_dir().glob("*/*.yaml"))


def _compose(recipe: str, overrides: list[str] = ()):
    return compose_recipe(recipe, overrides, return_hydra_config=True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    cfg = _compose(recipe)
    assert cfg.recipe_name == recipe
    assert cfg.trainer._target_
    if cfg.get("pipeline") == "vlm":  # a teacher built here (lm + vision) or a trained one's dir
        assert cfg.teacher.get("lm") or "path" in cfg.teacher
    else:
        assert cfg.teacher.name_or_path


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = _compose("nano-text", [f"{group}={option}"])
    assert group in cfg


# What each configs/loss option means: (divergence, kd_weight, ce_weight, other fields).
LOSS_OPTIONS = {
    "fkl": ("forward_kl", 1.0, 0.0, {}),
    "fkl_ce": ("forward_kl", 1.0, 1.0, {}),
    "rkl": ("reverse_kl", 1.0, 0.0, {}),
    "jsd": ("jsd", 1.0, 0.0, {"params": {"beta": 0.5}}),
    "gkd": ("jsd", 1.0, 0.0, {"params": {"beta": 0.5}, "on_policy_fraction": 0.5}),
    "skew_fkl": ("skew_forward_kl", 1.0, 0.0, {"params": {"alpha": 0.1}}),
    "skew_rkl": ("skew_reverse_kl", 1.0, 0.0, {"params": {"alpha": 0.1}}),
    "tvd": ("total_variation", 1.0, 0.0, {}),
    "ce": ("forward_kl", 0.0, 1.0, {}),
    "hidden": ("forward_kl", 1.0, 0.0, {"hidden_weight": 1.0, "hidden_loss": "mse"}),
    "topk_cached": ("forward_kl", 1.0, 0.0, {"top_k": 64}),
}


def test_loss_options_are_all_listed():
    assert {o for g, o in GROUP_OPTIONS if g == "loss"} == set(LOSS_OPTIONS)


@pytest.mark.parametrize("option", sorted(LOSS_OPTIONS))
def test_loss_option_composes_the_loss_it_names(option):
    """loss=<option> builds the divergence it names: the fields, and the value on fixed
    logits against the divergence function itself (forward and reverse KL differ here)."""
    import torch
    import torch.nn.functional as F

    from distill.losses import DIVERGENCES

    kind, kd_weight, ce_weight, extra = LOSS_OPTIONS[option]
    loss = instantiate(_compose("nano-text", [f"loss={option}"]).loss)
    assert (loss.kind, loss.kd_weight, loss.ce_weight) == (kind, kd_weight, ce_weight)
    for name, value in extra.items():
        assert getattr(loss, name) == value, name
    if option == "topk_cached":
        assert loss.cache and "teacher-cache" in loss.cache
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), 2 * torch.randn(2, 3, 11, generator=g)
    labels = torch.randint(0, 11, (2, 3), generator=g)
    got = loss(s, t, labels)["loss"]
    log_ps, log_pt = F.log_softmax(s.flatten(0, 1), -1), F.log_softmax(t.flatten(0, 1), -1)
    kd = DIVERGENCES[kind](log_ps, log_pt, **loss.params).mean()
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(got, kd_weight * kd + ce_weight * ce)
    fkl, rkl = (DIVERGENCES[k](log_ps, log_pt).mean() for k in ("forward_kl", "reverse_kl"))
    assert abs(fkl - rkl) > 0.1  # so the value tells the two apart


def test_components_instantiate(tmp_path, tokenizer):
    cfg = _compose("nano-text", ["trainer.max_steps=1"])
    assert cfg.trainer.precision == "auto"  # the CPU default: resolved before the Trainer is made
    resolve_trainer_precision(cfg)
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
