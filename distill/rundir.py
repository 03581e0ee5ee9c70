"""Run directories `outputs/<recipe>/<timestamp>/` and where a resumed run continues."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from omegaconf import OmegaConf

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def _is_set(value) -> bool:
    return value not in (None, False, "", "null", "None", "false", "False")


def run_dir_for(output_root: str, recipe: str, resume=None) -> str:
    """The run directory: a new timestamped one, or the one being resumed.

    `resume=true` continues the newest run of this recipe that has a last checkpoint;
    `resume=<dir or .ckpt>` continues that run.
    """
    if not _is_set(resume):
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        return str(Path(output_root) / recipe / stamp)
    if resume in (True, "true", "True"):
        runs = sorted(
            p.parent.parent for p in (Path(output_root) / recipe).glob(f"*/{LAST_CHECKPOINT}")
        )
        if not runs:
            raise FileNotFoundError(
                f"resume=true but no run under {Path(output_root) / recipe} has {LAST_CHECKPOINT}"
            )
        return str(runs[-1])
    path = Path(str(resume)).expanduser()
    if path.suffix == ".ckpt":
        return str(path.parent.parent)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such run directory or checkpoint")
    return str(path)


def checkpoint_to_resume(run_dir: Path, resume) -> str | None:
    """The checkpoint Lightning should resume from, or None for a fresh start."""
    if not _is_set(resume):
        return None
    path = Path(str(resume))
    if path.suffix == ".ckpt":
        return str(path)
    last = run_dir / LAST_CHECKPOINT
    return str(last) if last.exists() else None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("nd_run_dir"):
        # Cached so that every read of hydra.run.dir within one launch agrees on the timestamp.
        OmegaConf.register_new_resolver("nd_run_dir", run_dir_for, use_cache=True)
