"""Family adapters: where a model family keeps its decoder parts, and which weight axis is which.

Pruning is written once against these role maps, so a new family (or the VLM's vision tower,
whose blocks have the same q/k/v/o + MLP shape under another path) is one more entry here.
Every weight axis carries a role: `hidden` (residual channels), `ffn` (MLP neurons), `q` / `kv`
(attention heads × head_dim), or None (kept whole, e.g. the vocabulary axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

Role = str | None

# Llama, Qwen2 and Mistral share this block layout; Qwen2 adds q/k/v biases.
LLAMA_LAYER_ROLES: dict[str, tuple[Role, ...]] = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "mlp.gate_proj.weight": ("ffn", "hidden"),
    "mlp.up_proj.weight": ("ffn", "hidden"),
    "mlp.down_proj.weight": ("hidden", "ffn"),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
}
LLAMA_GLOBAL_ROLES: dict[str, tuple[Role, ...]] = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
}


@dataclass(frozen=True)
class DecoderAdapter:
    """How to find and slice one decoder family. Paths are dotted attribute paths from the model."""

    base: str = "model"  # the decoder without the LM head: calibration skips the vocab projection
    layers: str = "model.layers"
    layer_prefix: str = "model.layers."  # state-dict prefix of layer i is f"{layer_prefix}{i}."
    mlp_down: str = "mlp.down_proj"  # its input is the MLP activation (B, S, ffn)
    attn_out: str = "self_attn.o_proj"  # its input is the per-head attention output (B, S, q)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # per layer
    final_norm: str = "model.norm"
    layer_roles: dict[str, tuple[Role, ...]] = field(default_factory=lambda: LLAMA_LAYER_ROLES)
    global_roles: dict[str, tuple[Role, ...]] = field(default_factory=lambda: LLAMA_GLOBAL_ROLES)
    # config attributes that list one entry per layer and must follow depth pruning
    per_layer_config: tuple[str, ...] = ("layer_types", "sliding_window_layers")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def roles(self, name: str) -> tuple[Role, ...] | None:
        """Axis roles of the state-dict entry `name`, or None when it has none (copied whole)."""
        if name.startswith(self.layer_prefix):
            local = name[len(self.layer_prefix) :].split(".", 1)[1]
            return self.layer_roles.get(local)
        return self.global_roles.get(name)


# Idefics3's SigLIP-style vision encoder: the same block roles under other names, with biases,
# LayerNorm (weight + bias) and no GQA (every head its own K/V). Its attention width is tied to
# the residual width (head_dim = hidden_size / heads), so a width-pruned tower drops whole heads
# and keeps hidden_size = heads × head_dim.
SIGLIP_LAYER_ROLES: dict[str, tuple[Role, ...]] = {
    **{f"self_attn.{x}_proj.weight": ("kv" if x in "kv" else "q", "hidden") for x in "qkv"},
    **{f"self_attn.{x}_proj.bias": ("kv" if x in "kv" else "q",) for x in "qkv"},
    "self_attn.out_proj.weight": ("hidden", "q"),
    "self_attn.out_proj.bias": ("hidden",),
    "mlp.fc1.weight": ("ffn", "hidden"),
    "mlp.fc1.bias": ("ffn",),
    "mlp.fc2.weight": ("hidden", "ffn"),
    "mlp.fc2.bias": ("hidden",),
    **{f"layer_norm{i}.{k}": ("hidden",) for i in (1, 2) for k in ("weight", "bias")},
}
SIGLIP_GLOBAL_ROLES: dict[str, tuple[Role, ...]] = {
    "embeddings.patch_embedding.weight": ("hidden", None, None, None),
    "embeddings.patch_embedding.bias": ("hidden",),
    "embeddings.position_embedding.weight": (None, "hidden"),
    "post_layernorm.weight": ("hidden",),
    "post_layernorm.bias": ("hidden",),
}

ADAPTERS: dict[str, DecoderAdapter] = {
    "llama": DecoderAdapter(),
    "qwen2": DecoderAdapter(),
    "mistral": DecoderAdapter(),
    # the vision tower alone (model.model.vision_model of an Idefics3); its LM is a llama entry
    "idefics3_vision": DecoderAdapter(
        base="",
        layers="encoder.layers",
        layer_prefix="encoder.layers.",
        mlp_down="mlp.fc2",
        attn_out="self_attn.out_proj",
        norms=("layer_norm1", "layer_norm2"),
        final_norm="post_layernorm",
        layer_roles=SIGLIP_LAYER_ROLES,
        global_roles=SIGLIP_GLOBAL_ROLES,
        per_layer_config=(),
    ),
}


def adapter_for(model_or_config) -> DecoderAdapter:
    """The adapter for a model (or config) by its `model_type`; a clear error when unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"pruning does not support model_type '{model_type}' "
            f"({type(model_or_config).__name__}); supported: {', '.join(sorted(ADAPTERS))}. "
            "Add a DecoderAdapter for it in distill/prune/adapters.py"
        )
    return ADAPTERS[model_type]
