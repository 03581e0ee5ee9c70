"""A model's shape (vocabulary, context, decoder dims) from its config alone, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.validate.problems import Problems


@dataclass(frozen=True)
class ModelShape:
    """What the checks need from a model's config (its text decoder's, for a VLM)."""

    config: object  # the transformers config
    vocab_size: int
    context: int | None  # max_position_embeddings
    dims: object | None  # distill.prune.plan.Dims of the decoder, when it has Llama-style dims


def model_shape(knob: str, name_or_path, p: Problems) -> ModelShape | None:
    """Read the config of a model reference (embedded name, HF dir or id, .gguf); None + a
    problem when it cannot be read. Loads no weights."""
    from distill.assets import TEACHER_NAME, MissingAssetError, locate
    from distill.models.loading import resolve_model_path
    from distill.paths import home_dir

    if not isinstance(name_or_path, str) or not name_or_path:
        p.add(knob, name_or_path, "must be a model name, a Hugging Face directory or a .gguf file")
        return None
    gguf = None
    if name_or_path == TEACHER_NAME:
        path = home_dir() / "models" / TEACHER_NAME
        if not (path / "config.json").exists():  # not converted yet: read the GGUF's header
            try:
                located = locate("teacher-lm")
            except MissingAssetError as e:
                p.add(knob, name_or_path, str(e))
                return None
            path, gguf = located.parent, located.name
    else:
        local = Path(name_or_path).expanduser()
        looks_local = (
            local.is_absolute()
            or name_or_path.startswith((".", "~"))
            or local.suffix == ".gguf"
            or name_or_path.count("/") > 1  # a hub id is <name> or <org>/<name>
        )
        if looks_local and not local.exists():
            p.add(knob, name_or_path, "no such directory or file")
            return None
        try:
            path, gguf = resolve_model_path(name_or_path)
        except FileNotFoundError as e:
            p.add(knob, name_or_path, str(e))
            return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 — any reason the config is unreadable is the answer
        p.add(knob, name_or_path, f"cannot read its model config ({type(e).__name__}: {e})")
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = None
    try:
        from distill.prune.plan import Dims

        dims = Dims.of(text)
    except (AttributeError, TypeError):
        pass
    vocab = getattr(text, "vocab_size", None)
    context = getattr(text, "max_position_embeddings", None)
    return ModelShape(config, vocab, context, dims)
