"""The export directory format, read by the serving runtime and written by `distill export`.

An export is a Hugging Face model directory plus `serving.json`:

    config.json            model config; `quantization_config` (compressed-tensors) when INT8
    model.safetensors      weights (or sharded with model.safetensors.index.json); INT8 layers
                           store `<name>.weight` int8 (out, in) + `<name>.weight_scale` fp32 (out, 1)
    tokenizer.json, tokenizer_config.json, chat_template.jinja (or inside tokenizer_config)
    serving.json           ServingSpec below: model name, context length, pricing, limits,
                           chat template

Only torch/safetensors/json here (`serve` is a leaf package); `distill.export` imports this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

SERVING_FILE = "serving.json"
CACHE_READ_FRACTION = 0.1  # prompt-cache reads are priced at 10% of the input rate


@dataclass
class Pricing:
    """USD per 1M tokens. `cache_read_per_1m` defaults to 0.1 × input,
    `cache_creation_per_1m` (prompt tokens newly written to the cache) to the input rate."""

    input_per_1m: float = 0.05
    output_per_1m: float = 0.20
    cache_read_per_1m: float | None = None
    cache_creation_per_1m: float | None = None
    currency: str = "USD"
    batch_discount: float = 0.5  # fraction off every rate for /v1/batches and `distill batch` lines

    def __post_init__(self) -> None:
        if self.cache_read_per_1m is None:
            self.cache_read_per_1m = round(CACHE_READ_FRACTION * self.input_per_1m, 12)
        if self.cache_creation_per_1m is None:
            self.cache_creation_per_1m = self.input_per_1m
        rates = ("input_per_1m", "output_per_1m", "cache_read_per_1m", "cache_creation_per_1m")
        for name in rates:
            if getattr(self, name) < 0:
                raise ValueError(f"serving.json pricing.{name} must be >= 0")
        if not 0 <= self.batch_discount < 1:
            raise ValueError("serving.json pricing.batch_discount must be in [0, 1)")


@dataclass
class Limits:
    """Per-request and per-server limits the API enforces (4xx when exceeded)."""

    max_output_tokens: int = 512
    max_concurrent_requests: int = 16
    max_batch_size: int = 8
    requests_per_minute: int = 600
    max_images: int = 8  # images per request (a VLM; a text model refuses any)
    max_image_bytes: int = 5 << 20  # encoded bytes per image (base64 decoded)
    max_image_pixels: int = 4096 * 4096  # width × height per image, checked before decoding

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"serving.json limits.{name} must be a positive integer")


@dataclass
class ServingSpec:
    """Contents of serving.json."""

    model: str
    context_length: int
    pricing: Pricing = field(default_factory=Pricing)
    limits: Limits = field(default_factory=Limits)
    quantization: str = "none"  # "none" | "int8"
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("serving.json needs a non-empty 'model' name")
        if not isinstance(self.context_length, int) or self.context_length <= 0:
            raise ValueError("serving.json context_length must be a positive integer")
        if self.quantization not in ("none", "int8"):
            raise ValueError(
                f"serving.json quantization must be none|int8, got {self.quantization!r}"
            )
        if self.limits.max_output_tokens > self.context_length:
            self.limits.max_output_tokens = self.context_length

    @classmethod
    def from_dict(cls, data: dict) -> ServingSpec:
        data = dict(data)
        try:
            data["pricing"] = Pricing(**data.get("pricing", {}))
            data["limits"] = Limits(**data.get("limits", {}))
            return cls(**data)
        except TypeError as e:  # unknown or missing keys
            raise ValueError(f"invalid serving.json: {e}") from e

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, export_dir: str | Path) -> Path:
        path = Path(export_dir) / SERVING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class QuantSpec:
    """The parts of a compressed-tensors `quantization_config` the runtime needs."""

    format: str  # "int-quantized" for our INT8 exports
    weight_bits: int
    weight_strategy: str  # "channel"
    activation_bits: int | None  # None: weight-only
    activation_strategy: str | None  # "token"
    targets: list[str]
    ignore: list[str]

    @classmethod
    def from_config(cls, qc: dict) -> QuantSpec:
        if qc.get("quant_method") != "compressed-tensors":
            raise ValueError(f"unsupported quant_method {qc.get('quant_method')!r}")
        groups = list(qc.get("config_groups", {}).values())
        linear = next((g for g in groups if "Linear" in g.get("targets", [])), None)
        if linear is None or not linear.get("weights"):
            raise ValueError("quantization_config has no weight scheme for Linear layers")
        weights, acts = linear["weights"], linear.get("input_activations") or {}
        if weights.get("type") != "int" or weights.get("num_bits") != 8:
            raise ValueError(f"only int8 weights are supported, got {weights}")
        return cls(
            format=qc.get("format", linear.get("format", "")),
            weight_bits=weights["num_bits"],
            weight_strategy=weights.get("strategy", "channel"),
            activation_bits=acts.get("num_bits"),
            activation_strategy=acts.get("strategy"),
            targets=sorted({t for g in groups for t in g.get("targets", [])}),
            ignore=list(qc.get("ignore", [])),
        )


@dataclass
class Export:
    """A read export directory. `load_tensors()` reads the weights (int8 kept as int8)."""

    path: Path
    config: dict
    serving: ServingSpec
    quant: QuantSpec | None

    @property
    def is_int8(self) -> bool:
        return self.quant is not None

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / n for n in names]
        single = self.path / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{self.path} has no model.safetensors")
        return [single]

    def load_tensors(self, device: str = "cpu") -> dict[str, Tensor]:
        from safetensors.torch import load_file

        tensors: dict[str, Tensor] = {}
        for f in self.weight_files():
            tensors.update(load_file(f, device=device))
        return tensors

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())

    def int8_head_source(self, tensors: dict[str, Tensor]) -> str | None:
        """Name of the int8 table a tied lm_head should run on (None when the head has weights)."""
        if "lm_head.weight" in tensors or not self.tied_embeddings:
            return None
        for name, t in tensors.items():
            if name.endswith("embed_tokens.weight") and t.dtype == torch.int8:
                return name.removesuffix(".weight")
        return None


def read_export(path: str | Path) -> Export:
    """Read and validate an export directory (clear errors naming the missing piece)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"export directory not found: {path}")
    config_file, serving_file = path / "config.json", path / SERVING_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; not an export directory")
    if not serving_file.exists():
        raise FileNotFoundError(f"{path} has no {SERVING_FILE}; run `python -m distill export`")
    config = json.loads(config_file.read_text())
    try:
        serving = ServingSpec.from_dict(json.loads(serving_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{serving_file} is not valid JSON: {e}") from e
    qc = config.get("quantization_config")
    quant = QuantSpec.from_config(qc) if qc else None
    if (quant is not None) != (serving.quantization == "int8"):
        raise ValueError(
            f"{path}: serving.json says quantization={serving.quantization!r} but config.json "
            f"{'has' if quant else 'has no'} quantization_config"
        )
    return Export(path=path, config=config, serving=serving, quant=quant)
