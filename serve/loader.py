"""Load an HF-format checkpoint directory (config.json + safetensors) into `serve.llama.LlamaModel`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from serve.llama import LlamaModel, rope_tables
from serve.model_args import ModelArgs


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors file(s), by their HF names."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(model_dir / name))
    return state


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `model.…` / `model.language_model.…` / `model.text_model.…` names to `…`."""
    out = {}
    for name, tensor in state.items():
        for prefix in ("model.language_model.", "model.text_model.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = tensor
    return out


def convert_hf_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """HF Llama tensor names → this runtime's (q/k/v and gate/up fused along the output dim)."""
    s = _strip_prefix(state)

    def take(name: str) -> torch.Tensor:
        if name not in s:
            raise KeyError(f"checkpoint is missing tensor '{name}'")
        return s[name]

    out = {"embed.weight": take("embed_tokens.weight"), "norm": take("norm.weight")}
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(args.num_layers):
        p = f"layers.{i}."
        att, mlp = p + "self_attn.", p + "mlp."
        out[p + "attn_norm"] = take(p + "input_layernorm.weight")
        out[p + "mlp_norm"] = take(p + "post_attention_layernorm.weight")
        out[p + "qkv.weight"] = torch.cat([take(att + f"{x}_proj.weight") for x in "qkv"])
        out[p + "o.weight"] = take(att + "o_proj.weight")
        if args.attention_bias:
            out[p + "qkv.bias"] = torch.cat([take(att + f"{x}_proj.bias") for x in "qkv"])
            if att + "o_proj.bias" in s:
                out[p + "o.bias"] = s[att + "o_proj.bias"]
        out[p + "gate_up.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]
        )
        out[p + "down.weight"] = take(mlp + "down_proj.weight")
        if args.mlp_bias:
            out[p + "gate_up.bias"] = torch.cat(
                [take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")]
            )
            out[p + "down.bias"] = take(mlp + "down_proj.bias")
    return out


def text_config(config: dict) -> dict:
    """The decoder's config: the file itself, or a VLM's `text_config`."""
    return config.get("text_config", config)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """The checkpoint in `model_dir` as a `LlamaModel` in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; not a model directory")
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise NotImplementedError(
            f"{model_dir} is quantized ({config['quantization_config'].get('quant_method')}); "
            "this loader reads float checkpoints only"
        )
    args = ModelArgs.from_config(text_config(config))
    with torch.device("meta"):
        model = LlamaModel(args)
    state = convert_hf_state_dict(read_state_dict(model_dir), args)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"weights missing after loading {model_dir}: {missing[:5]}")
    model.cos, model.sin = rope_tables(args)  # buffers were created on meta
    return model.eval()
