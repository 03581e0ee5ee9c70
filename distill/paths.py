"""Where configs, recipes and cached assets live, in a checkout and in an installed package."""

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"none of these directories exist: {[str(c) for c in candidates]}")


def configs_dir() -> Path:
    """`configs/` of a checkout, else the copy the wheel installs as `distill/_configs`."""
    return _first_existing(_PACKAGE_DIR.parent / "configs", _PACKAGE_DIR / "_configs")


def recipes_dir() -> Path:
    """`recipes/` of a checkout, else the copy the wheel installs as `distill/_recipes`."""
    return _first_existing(_PACKAGE_DIR.parent / "recipes", _PACKAGE_DIR / "_recipes")


def home_dir() -> Path:
    """Cache for converted assets (e.g. the teacher as safetensors); `NANODISTILL_HOME` overrides."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanodistill"
    path = Path(os.environ.get("NANODISTILL_HOME", default))
    path.mkdir(parents=True, exist_ok=True)
    return path
