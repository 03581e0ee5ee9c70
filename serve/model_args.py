"""Model hyperparameters read from an export's `config.json` (never guessed from a file name)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Text decoders this runtime's `serve/llama.py` implements (q/k/v/o + gate/up/down, RMSNorm, RoPE).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm3")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class ModelArgs:
    """Llama-family decoder dimensions; validated on construction."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in LLAMA_FAMILY:
            raise ValueError(
                f"model_type '{self.model_type}' is not a Llama-family decoder; "
                f"supported: {', '.join(LLAMA_FAMILY)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type '{rope_type}' is not supported; supported: {ROPE_TYPES}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a transformers config dict (a text config, or a VLM's `text_config`)."""
        num_heads = config["num_attention_heads"]
        # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=config.get("model_type", "llama"),
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            intermediate_size=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", True),
            # Qwen2 has q/k/v biases without an `attention_bias` key.
            attention_bias=config.get("attention_bias", config.get("model_type") == "qwen2"),
            mlp_bias=config.get("mlp_bias", False),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArgs:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; not a model directory")
        return cls.from_config(json.loads(path.read_text()))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies with the config's scaling applied; shape [head_dim // 2]."""
        dim = self.head_dim
        # Computed in fp32 exactly as transformers does, so positions far out still agree.
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        kind = self.rope_scaling.get("rope_type", "default")
        factor = float(self.rope_scaling.get("factor", 1.0))
        if kind == "linear":
            inv = inv / factor
        elif kind == "llama3":
            # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
            low = float(self.rope_scaling.get("low_freq_factor", 1.0))
            high = float(self.rope_scaling.get("high_freq_factor", 4.0))
            old_ctx = float(self.rope_scaling.get("original_max_position_embeddings", 8192))
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            mid = (1 - smooth) * inv / factor + smooth * inv
            inv = torch.where(wavelen > old_ctx / low, inv / factor, inv)
            is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            inv = torch.where(is_mid, mid, inv)
        # "dynamic" NTK only changes frequencies beyond max_position_embeddings, which the
        # scheduler never reaches (requests are capped at the context length).
        return inv
