"""Loading the models an evaluation compares: teacher / student directories (causal LMs or
vision-language models) and int8 students on int8 CPU kernels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_model(path: str, device: str) -> nn.Module:
    """A causal LM, or an image-text-to-text model when its config has a vision tower."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from distill.models.loading import load_causal_lm, resolve_model_path

    resolved, gguf = resolve_model_path(path)
    if gguf is None and getattr(AutoConfig.from_pretrained(resolved), "vision_config", None):
        model = AutoModelForImageTextToText.from_pretrained(resolved, dtype=torch.float32)
        return model.to(device).eval()
    return load_causal_lm(path, "float32", device).eval()


def load_int8(path: str, device: str, int8_kernels: bool = True) -> nn.Module:
    """An int8 student (QAT `student-qat/` or an export) through transformers.

    transformers decompresses compressed-tensors INT8 to fp32, which would time fp32 kernels;
    on CPU, with `int8_kernels`, every int8 Linear / Embedding is swapped for serve.int8's
    fbgemm modules built from the int8 tensors on disk, so the speed section measures int8.
    """
    model = load_model(path, device)
    model.nd_parameters = sum(p.numel() for p in model.parameters())  # before int8 swaps
    config = json.loads((Path(path) / "config.json").read_text())
    if not (int8_kernels and device == "cpu" and config.get("quantization_config")):
        return model
    from serve.int8 import swap_in_int8
    from serve.loader import read_state_dict

    tensors = read_state_dict(path)
    head = None
    if "lm_head.weight" not in tensors and config.get("tie_word_embeddings"):
        table = tensors.get("model.embed_tokens.weight")
        head = "model.embed_tokens" if table is not None and table.dtype == torch.int8 else None
    swapped = swap_in_int8(model, tensors, lm_head_from=head)
    log.info("eval: %s — %d modules on int8 kernels", path, len(swapped))
    return model.eval()
