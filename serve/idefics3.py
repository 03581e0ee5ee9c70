"""Idefics3 / SmolVLM vision side: SigLIP-style ViT encoder + pixel-shuffle connector.

The language model is `serve.llama.LlamaModel`; images enter it as embeddings that replace
the prompt's `<image>` placeholder tokens, one row per placeholder, in order.
Images here are whole tiles (every patch valid), which is what the Idefics3 processor's
image splitting produces for one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    scale_factor: int  # pixel shuffle: scale_factor² patches → one token
    text_hidden_size: int
    image_token_id: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VisionArgs:
        v = config["vision_config"]
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act '{act}' is not supported (gelu_pytorch_tanh only)")
        return cls(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            scale_factor=config.get("scale_factor", 2),
            text_hidden_size=config["text_config"]["hidden_size"],
            image_token_id=config["image_token_id"],
        )

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


class EncoderLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        d = a.hidden_size
        self.heads = a.num_heads
        self.norm1 = nn.LayerNorm(d, eps=a.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=a.layer_norm_eps)
        self.fc1 = nn.Linear(d, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)  # [B, heads, n, hd], bidirectional
        x = x + self.out(att.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Idefics3Vision(nn.Module):
    """pixel_values [images, 3, S, S] → image embeddings [images, tokens_per_image, text_d]."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        side = a.image_size // a.patch_size
        self.patch_embed = nn.Conv2d(3, a.hidden_size, a.patch_size, stride=a.patch_size)
        self.pos_embed = nn.Embedding(side * side, a.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(a) for _ in range(a.num_layers))
        self.post_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.proj = nn.Linear(a.hidden_size * a.scale_factor**2, a.text_hidden_size, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, side², d] → [B, side²/s², d·s²]: each s×s patch square becomes one token."""
        b, n, d = x.shape
        side, s = int(n**0.5), self.args.scale_factor
        x = x.view(b, side, side // s, d * s).transpose(1, 2)  # merge s columns
        x = x.reshape(b, side // s, side // s, d * s * s).transpose(1, 2)  # merge s rows
        return x.reshape(b, n // (s * s), d * s * s)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        a = self.args
        if pixel_values.shape[-2:] != (a.image_size, a.image_size):
            raise ValueError(
                f"image tiles must be {a.image_size}×{a.image_size}, got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.patch_embed(pixel_values.float()).flatten(2).transpose(1, 2)  # [B, side², d]
        x = x + self.pos_embed.weight  # whole tiles: patch i has position i
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.pixel_shuffle(self.post_norm(x)))


def convert_vision_state_dict(
    state: dict[str, torch.Tensor], a: VisionArgs
) -> dict[str, torch.Tensor]:
    """HF Idefics3 vision + connector tensor names → `Idefics3Vision`'s (q/k/v fused).

    An INT8 export's linears carry int8 `.weight` and per-row `.weight_scale`: both are kept
    (q/k/v rows and their scales concatenate alike) for `serve.int8.swap_in_int8`."""
    src = "model.vision_model."
    out = {
        "patch_embed.weight": state[src + "embeddings.patch_embedding.weight"],
        "patch_embed.bias": state[src + "embeddings.patch_embedding.bias"],
        "pos_embed.weight": state[src + "embeddings.position_embedding.weight"],
        "post_norm.weight": state[src + "post_layernorm.weight"],
        "post_norm.bias": state[src + "post_layernorm.bias"],
    }

    def linear(new: str, olds: list[str], kinds: tuple[str, ...]) -> None:
        if f"{olds[0]}.weight_scale" in state:
            kinds = (*kinds, "weight_scale")
        for kind in kinds:
            out[f"{new}.{kind}"] = torch.cat([state[f"{old}.{kind}"] for old in olds])

    linear("proj", ["model.connector.modality_projection.proj"], ("weight",))
    for i in range(a.num_layers):
        p, q = f"{src}encoder.layers.{i}.", f"layers.{i}."
        att = p + "self_attn."
        linear(q + "qkv", [f"{att}{x}_proj" for x in "qkv"], ("weight", "bias"))
        linear(q + "out", [f"{att}out_proj"], ("weight", "bias"))
        linear(q + "fc1", [f"{p}mlp.fc1"], ("weight", "bias"))
        linear(q + "fc2", [f"{p}mlp.fc2"], ("weight", "bias"))
        for kind in ("weight", "bias"):
            out[q + "norm1." + kind] = state[f"{p}layer_norm1.{kind}"]
            out[q + "norm2." + kind] = state[f"{p}layer_norm2.{kind}"]
    return out
