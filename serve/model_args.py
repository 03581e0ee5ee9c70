"""Model hyperparameters read from an export's `config.json` (never guessed from a file name).

Every key that transformers' modeling code for an accepted family reads is either
implemented here or refused with a ValueError naming the key and its value; a key absent
from `config.json` takes the default of that family's transformers config class (see
`_DEFAULTS`, checked against the installed transformers by tests/test_serve_config_parity).
Keys that family's modeling code never reads (`rope_interleaved`, `pretraining_tp`, a Llama's
`sliding_window`, …) change nothing in transformers either and are ignored alike.
"""

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
ACTIVATIONS = ("silu", "swish")  # both are x * sigmoid(x) in transformers' ACT2FN
LAYER_TYPES = ("full_attention", "sliding_attention")

# Defaults of transformers 5's LlamaConfig / MistralConfig / Qwen2Config / SmolLM3Config for
# the keys read below (None = derived: num_key_value_heads → heads, head_dim → hidden / heads).
_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "num_key_value_heads": None,
    "head_dim": None,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    },
    "qwen2": {
        **_COMMON,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
    },
    "smollm3": {
        **_COMMON,
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "rope_theta": 2000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "no_rope_layers": None,
        "no_rope_layer_interval": 4,
        "layer_types": None,
        "attention_bias": False,
        "mlp_bias": False,
    },
}


def _refuse(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json {key}={value!r}: {why}")


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
    qkv_bias: bool = False
    o_bias: bool = False  # Qwen2: q/k/v have biases, o_proj none; Llama's attention_bias: all four
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    # Per layer: the sliding attention window (a query at p sees keys p - w < j <= p), None =
    # full causal attention; and whether the layer applies RoPE (SmolLM3's NoPE layers do not).
    # Empty = every layer full / with RoPE.
    layer_windows: tuple[int | None, ...] = ()
    rope_layers: tuple[bool, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in LLAMA_FAMILY:
            raise ValueError(
                f"model_type '{self.model_type}' is not a Llama-family decoder this runtime "
                f"implements; supported: {', '.join(LLAMA_FAMILY)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; RoPE needs pairs")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type '{rope_type}' is not supported; supported: {ROPE_TYPES}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        for name in ("layer_windows", "rope_layers"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, not one a layer")
        if any(w is not None and w < 1 for w in self.layer_windows):
            raise ValueError(f"sliding windows must be >= 1, got {self.layer_windows}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a transformers config dict (a text config, or a VLM's `text_config`)."""
        model_type = config.get("model_type", "llama")
        if model_type not in _DEFAULTS:
            raise ValueError(
                f"model_type '{model_type}' is not a Llama-family decoder this runtime "
                f"implements; supported: {', '.join(LLAMA_FAMILY)}"
            )
        c = {**_DEFAULTS[model_type], **config}
        if c["hidden_act"] not in ACTIVATIONS:
            raise _refuse(
                "hidden_act", c["hidden_act"], f"the runtime implements only {ACTIVATIONS}"
            )
        num_layers, num_heads = c["num_hidden_layers"], c["num_attention_heads"]
        head_dim = c["head_dim"] or c["hidden_size"] // num_heads
        rope_theta, rope = _rope(c)
        windows, rope_layers = _layer_kinds(model_type, c)
        qkv_bias = o_bias = mlp_bias = False  # Mistral: no biases whatever the config says
        if model_type in ("llama", "smollm3"):
            qkv_bias = o_bias = bool(c["attention_bias"])
            mlp_bias = bool(c["mlp_bias"])
        elif model_type == "qwen2":  # fixed in Qwen2Attention; `attention_bias` is not read
            qkv_bias = True
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=c["num_key_value_heads"] or num_heads,
            head_dim=head_dim,
            intermediate_size=c["intermediate_size"],
            rms_norm_eps=float(c["rms_norm_eps"]),
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            rope_theta=rope_theta,
            rope_scaling=rope,
            layer_windows=windows,
            rope_layers=rope_layers,
            eos_token_ids=eos_ids,
            bos_token_id=c.get("bos_token_id"),
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
        if kind == "linear":
            inv = inv / float(self.rope_scaling["factor"])
        elif kind == "llama3":
            # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
            factor = float(self.rope_scaling["factor"])
            low = float(self.rope_scaling["low_freq_factor"])
            high = float(self.rope_scaling["high_freq_factor"])
            old_ctx = float(self.rope_scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            mid = (1 - smooth) * inv / factor + smooth * inv
            inv = torch.where(wavelen > old_ctx / low, inv / factor, inv)
            is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            inv = torch.where(is_mid, mid, inv)
        # "dynamic" NTK only changes frequencies beyond max_position_embeddings, which the
        # scheduler never reaches (requests are capped at the context length).
        return inv


_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, normalised rope parameters) with transformers 5's precedence: a 4.x
    `rope_scaling` dict over `rope_parameters`, theta inside the dict over a top-level
    `rope_theta` over the family's default."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    rope = dict(c.get(key) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise _refuse(key, rope, "per-layer-type RoPE parameters are not implemented")
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise _refuse(f"{key}.rope_type", kind, f"the runtime implements only {ROPE_TYPES}")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise _refuse("partial_rotary_factor", partial, "partial RoPE is not implemented")
    for name in _ROPE_REQUIRED[kind]:
        if rope.get(name) is None:
            raise _refuse(f"{key}.{name}", None, f"rope_type '{kind}' needs it")
    if kind == "llama3":  # a top-level value wins, as in transformers' standardize_rope_params
        old = c.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings"
        )
        rope["original_max_position_embeddings"] = old or c["max_position_embeddings"]
    theta = rope.pop("rope_theta", None)
    return float(theta if theta is not None else c["rope_theta"]), rope


def _layer_kinds(
    model_type: str, c: dict[str, Any]
) -> tuple[tuple[int | None, ...], tuple[bool, ...]]:
    """Per layer: the sliding window (None = full attention) and whether RoPE is applied, as
    transformers' modeling code for `model_type` derives them."""
    n = c["num_hidden_layers"]
    if model_type == "llama":  # LlamaModel never reads sliding_window / layer_types
        return (None,) * n, (True,) * n
    window = c["sliding_window"]
    if window is not None and (not isinstance(window, int) or window < 1):
        raise _refuse("sliding_window", window, "must be a positive integer or null")
    if model_type == "mistral":  # one window for every layer; `layer_types` is not read
        return (window,) * n, (True,) * n

    rope_layers = (True,) * n
    if model_type == "qwen2":
        if not c["use_sliding_window"]:
            window = None  # Qwen2Config drops the window unless use_sliding_window
        sliding = [window is not None and i >= c["max_window_layers"] for i in range(n)]
    else:  # smollm3: NoPE layers, and only NoPE layers slide by default
        flags = c["no_rope_layers"]
        if flags is None:
            flags = [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(n)]
        if len(flags) < n:
            raise _refuse("no_rope_layers", flags, f"needs an entry for each of {n} layers")
        rope_layers = tuple(bool(f) for f in flags[:n])
        slide = c["use_sliding_window"] and window is not None
        sliding = [slide and not rope_layers[i] for i in range(n)]
    types = c["layer_types"]
    if types is None:
        types = ["sliding_attention" if s else "full_attention" for s in sliding]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise _refuse(
            "layer_types", types, f"needs {n} entries, each one of {', '.join(LAYER_TYPES)}"
        )
    if "sliding_attention" in types:
        if window is None:
            key = "use_sliding_window" if c["sliding_window"] is not None else "sliding_window"
            raise _refuse(key, c[key], "layer_types has sliding_attention layers but no window")
        if model_type == "smollm3" and not c["use_sliding_window"]:
            # SmolLM3's eager/sdpa masks would slide, its flash-attention path would not.
            raise _refuse(
                "use_sliding_window", False, "contradicts layer_types' sliding_attention layers"
            )
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows, rope_layers
