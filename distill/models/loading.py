"""Load teachers and students: embedded default names, HF directories or ids, GGUF files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model reference.

    The embedded default's name maps to its converted safetensors directory; a `.gguf` path is
    loaded through transformers' GGUF reader.
    """
    from distill.assets import TEACHER_NAME, teacher_dir

    if name_or_path == TEACHER_NAME:
        return str(teacher_dir()), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists() and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} exists but has no config.json; not a Hugging Face model directory"
        )
    return str(path) if path.exists() else name_or_path, None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", load_in_8bit: bool = False
) -> nn.Module:
    """A transformers causal LM in `dtype` on `device` (8-bit via bitsandbytes on CUDA)."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = resolve_model_path(name_or_path)
    kwargs: dict = {"dtype": resolve_dtype(dtype)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_8bit:
        model = model.to(device)
    return model


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(name_or_path)
    tokenizer = (
        AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        if gguf_file
        else AutoTokenizer.from_pretrained(path)
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
