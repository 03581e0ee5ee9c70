"""Load an HF-format checkpoint directory (config.json + safetensors) into `serve.llama.LlamaModel`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from serve.export_format import QuantSpec
from serve.idefics3 import Idefics3Vision, VisionArgs, convert_vision_state_dict
from serve.int8 import swap_in_int8
from serve.llama import LlamaModel, interleave_rope_rows, rope_table
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
    """HF Llama tensor names → this runtime's (q/k/v and gate/up fused along the output dim).

    INT8 exports (compressed-tensors `int-quantized`) carry `<name>.weight` int8 and a
    per-output-channel `<name>.weight_scale`; fusing concatenates both, which keeps every row's
    scale with its row.

    Biases are taken exactly where the config implies them (`args.qkv_bias` etc.); a decoder
    tensor the config has no place for is refused rather than silently dropped.
    """
    s = _strip_prefix(state)
    used: set[str] = set()

    def take(name: str, why: str = "") -> torch.Tensor:
        if name not in s:
            raise KeyError(f"checkpoint is missing tensor '{name}'{why}")
        used.add(name)
        return s[name]

    out: dict[str, torch.Tensor] = {}

    def put(new: str, olds: list[str], bias: bool = False, why: str = "") -> None:
        """`new`.weight (+ .weight_scale if int8, + .bias if `bias`) from the concatenation
        of `olds`' tensors."""
        out[f"{new}.weight"] = torch.cat([take(f"{o}.weight") for o in olds])
        if out[f"{new}.weight"].dtype == torch.int8:
            out[f"{new}.weight_scale"] = torch.cat([take(f"{o}.weight_scale") for o in olds])
        if bias:
            out[f"{new}.bias"] = torch.cat([take(f"{o}.bias", why) for o in olds])

    hd, qk_heads = args.head_dim, args.num_heads + args.num_kv_heads
    qkv_rows = torch.cat(
        (
            interleave_rope_rows(hd, qk_heads),
            torch.arange(qk_heads * hd, (qk_heads + args.num_kv_heads) * hd),
        )
    )
    put("embed", ["embed_tokens"])
    out["norm"] = take("norm.weight")
    if not args.tie_word_embeddings:
        put("lm_head", ["lm_head"])
    attn_why = f" (config.json: model_type={args.model_type!r} with attention biases)"
    mlp_why = " (config.json: mlp_bias=true)"
    for i in range(args.num_layers):
        p = f"layers.{i}."
        att, mlp = p + "self_attn.", p + "mlp."
        out[p + "attn_norm"] = take(p + "input_layernorm.weight")
        out[p + "mlp_norm"] = take(p + "post_attention_layernorm.weight")
        put(p + "qkv", [att + f"{x}_proj" for x in "qkv"], args.qkv_bias, attn_why)
        for suffix in ("weight", "weight_scale", "bias"):  # q and k rows: adjacent RoPE pairs
            if (t := out.get(f"{p}qkv.{suffix}")) is not None:
                out[f"{p}qkv.{suffix}"] = t[qkv_rows]
        put(p + "o", [att + "o_proj"], args.o_bias, attn_why)
        put(p + "gate_up", [mlp + "gate_proj", mlp + "up_proj"], args.mlp_bias, mlp_why)
        put(p + "down", [mlp + "down_proj"], args.mlp_bias, mlp_why)
    unused = sorted(
        n
        for n in set(s) - used
        if n.startswith(("layers.", "norm.", "embed_tokens.", "lm_head."))
        and not n.endswith("rotary_emb.inv_freq")  # a cached buffer in old checkpoints
        and not (args.tie_word_embeddings and n.startswith("lm_head."))  # tied: unused in HF too
    )
    if unused:
        raise ValueError(
            f"checkpoint tensors {unused[:4]} have no place in a model_type="
            f"{args.model_type!r} decoder as config.json describes it (a bias, norm or layer "
            "it does not declare); refusing rather than computing without them"
        )
    return out


def text_config(config: dict) -> dict:
    """The decoder's config: the file itself, or a VLM's `text_config` (whose head tying is
    set at the top level)."""
    if "text_config" not in config:
        return config
    tied = config.get("tie_word_embeddings", config["text_config"].get("tie_word_embeddings"))
    return {**config["text_config"], "tie_word_embeddings": bool(tied)}


def load_vision(model_dir: str | Path) -> Idefics3Vision | None:
    """The vision encoder + connector of an Idefics3 checkpoint; None for a text-only model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "vision_config" not in config:
        return None
    if config.get("model_type") not in ("idefics3", "smolvlm"):
        raise ValueError(
            f"vision family '{config.get('model_type')}' is not supported (idefics3 only)"
        )
    args = VisionArgs.from_config(config)
    with torch.device("meta"):
        vision = Idefics3Vision(args)
    # W8A8 like the language model: an int8 weight cast to float without its scale gave the LM
    # garbage image features, silently.
    _assign(vision, convert_vision_state_dict(read_state_dict(model_dir), args))
    return vision.eval()


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """The checkpoint in `model_dir` as a `LlamaModel` in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; not a model directory")
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        QuantSpec.from_config(config["quantization_config"])  # clear error if unsupported
    args = ModelArgs.from_config(text_config(config))
    with torch.device("meta"):
        model = LlamaModel(args)
    state = convert_hf_state_dict(read_state_dict(model_dir), args)
    # a tied int8 head reuses the int8 table
    tied_int8 = args.tie_word_embeddings and state["embed.weight"].dtype == torch.int8
    _assign(model, state, dtype, lm_head_from="embed" if tied_int8 else None)
    model.rope = rope_table(args)  # buffers were created on meta
    model.pack_linears()
    return model.eval()


def _assign(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    lm_head_from: str | None = None,
) -> None:
    """Load a converted state into a meta-device `module`: INT8 layers (int8 `.weight` +
    `.weight_scale`) become serve.int8's fbgemm modules, the rest is assigned in `dtype`."""
    if any(t.dtype == torch.int8 for t in state.values()):
        swap_in_int8(module, state, lm_head_from=lm_head_from)
        state = {
            k: v for k, v in state.items() if v.dtype != torch.int8 and "weight_scale" not in k
        }
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:  # the converters checked the checkpoint: this is the runtime's fault
        raise RuntimeError(f"serve runtime bug: parameters {missing[:5]} were not loaded")
