"""Convert a GGUF checkpoint into a plain safetensors Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` with transformers and save model + tokenizer + chat template.

    A model loaded with `gguf_file=` refuses `save_pretrained`, so we rebuild the same class
    from its config without the quantization marker and load the dequantized weights into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
