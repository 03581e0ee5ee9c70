"""Write an export directory (format: serve/export_format.py) from a trained checkpoint.

  quant=none   fp32 safetensors of an fp32 checkpoint
  quant=int8   compressed-tensors int-quantized INT8: an INT8 checkpoint (student-qat/,
               student-ptq/) is copied as is; an fp32 checkpoint is PTQ-converted on the way
plus the tokenizer (and processor for VLMs) with its chat template, and `serving.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from distill.quant import Int8Scheme, save_int8, to_int8
from serve.export_format import Limits, Pricing, ServingSpec, read_export

log = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "int8")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def is_int8_checkpoint(checkpoint: Path) -> bool:
    config = json.loads((checkpoint / "config.json").read_text())
    return "quantization_config" in config


def _load_fp32(checkpoint: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(checkpoint)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return cls.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _copy_model_files(checkpoint: Path, output_dir: Path) -> None:
    for name in _MODEL_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, output_dir / name)
    for shard in checkpoint.glob("*.safetensors"):
        shutil.copy2(shard, output_dir / shard.name)


def _save_tokenizer(checkpoint: Path, output_dir: Path, tokenizer_path: Path | None) -> str | None:
    """Tokenizer (or processor, for VLMs) next to the weights; returns the chat template."""
    from transformers import AutoProcessor, AutoTokenizer

    source = tokenizer_path or checkpoint
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no tokenizer in {source}; pass tokenizer=<dir> to export ({e})"
        ) from e
    tokenizer.save_pretrained(output_dir)
    if (source / "preprocessor_config.json").exists():  # a VLM: image processor + template
        AutoProcessor.from_pretrained(source).save_pretrained(output_dir)
    return tokenizer.chat_template


def serving_spec(
    config: dict, name: str, chat_template: str | None, quant: str, serving: dict | None = None
) -> ServingSpec:
    """ServingSpec from the model config and the `serving` overrides (configs/serve/serving.yaml)."""
    serving = dict(serving or {})
    text_config = config.get("text_config", config)
    context = serving.get("context_length") or text_config.get("max_position_embeddings")
    if not context:
        raise ValueError("no context_length: set serving.context_length (config has none)")
    return ServingSpec(
        model=serving.get("model") or name,
        context_length=int(context),
        pricing=Pricing(**(serving.get("pricing") or {})),
        limits=Limits(**(serving.get("limits") or {})),
        quantization=quant,
        chat_template=chat_template,
    )


def export(
    checkpoint: str | Path,
    output_dir: str | Path,
    quant: str = "none",
    scheme: Int8Scheme | None = None,
    serving: dict | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write the export directory; returns it (validated by serve's reader)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"checkpoint={checkpoint}: not a Hugging Face model directory")
    if checkpoint.resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from the checkpoint directory")
    output_dir.mkdir(parents=True, exist_ok=True)

    if is_int8_checkpoint(checkpoint):
        if quant != "int8":
            raise ValueError(
                f"{checkpoint} is already INT8 (has quantization_config); export it with quant=int8"
            )
        _copy_model_files(checkpoint, output_dir)
    elif quant == "int8":
        save_int8(to_int8(_load_fp32(checkpoint), scheme or Int8Scheme()), output_dir)
    else:
        _load_fp32(checkpoint).save_pretrained(output_dir)

    chat_template = _save_tokenizer(checkpoint, output_dir, Path(tokenizer) if tokenizer else None)
    config = json.loads((output_dir / "config.json").read_text())
    spec = serving_spec(config, output_dir.name, chat_template, quant, serving)
    spec.save(output_dir)
    export_dir = read_export(output_dir)
    log.info(
        "export: %s (%s, %.1f MB of weights)", output_dir, quant, export_dir.weight_bytes() / 1e6
    )
    return output_dir


def load_export(export_dir: str | Path, int8_kernels: bool = True) -> torch.nn.Module:
    """A transformers model from an export; INT8 layers on serve.int8's fast CPU kernels.

    transformers' compressed-tensors loader decompresses INT8 to fp32 (reference numerics,
    fp32 speed); with `int8_kernels` every int8 Linear / Embedding is then swapped for
    Int8Linear (fbgemm) / Int8Embedding from the int8 tensors on disk, freeing the fp32 copies.
    """
    from transformers import AutoModelForCausalLM

    from serve.int8 import swap_in_int8

    exp = read_export(export_dir)
    model = AutoModelForCausalLM.from_pretrained(exp.path, dtype=torch.float32).eval()
    if exp.is_int8 and int8_kernels:
        tensors = exp.load_tensors()
        swapped = swap_in_int8(model, tensors, lm_head_from=exp.int8_head_source(tensors))
        log.info("load_export: %d modules on int8 kernels", len(swapped))
    return model


def export_stage(
    serving: dict | None, run_dir: Path, force: bool = False, name: str | None = None
) -> Path:
    """The train pipeline's last stage: `<run_dir>/export/` from its most finished student.

    QAT beats PTQ beats the fp32 student; an INT8 student exports as compressed-tensors INT8.
    `name` is the served model name (default: the directory's, "export").
    """
    out_dir = run_dir / "export"
    if (out_dir / "serving.json").exists() and not force:
        log.info("export: %s exists, skipping (force=true reruns)", out_dir)
        return out_dir
    for stage_dir in ("student-qat", "student-ptq", "student"):
        source = run_dir / stage_dir
        if (source / "config.json").exists():
            break
    else:
        raise FileNotFoundError(f"export: no student checkpoint in {run_dir}")
    quant = "int8" if is_int8_checkpoint(source) else "none"
    if name:
        serving = {**(serving or {}), "model": (serving or {}).get("model") or name}
    return export(source, out_dir, quant=quant, serving=serving)
