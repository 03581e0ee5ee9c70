"""INT8 weights on CPU: the quantization grid, and fast int8 modules for exported checkpoints.

The scheme (shared by QAT, PTQ, the export and the runtime) is W8A8-int:
  * weights: int8, symmetric, one fp32 scale per output channel (per row of the weight);
    scale = max|w_row| / 127.5, q = clamp(round(w / scale), -128, 127)  — the same formula as
    torchao's fake quantizer and compressed-tensors' `calculate_qparams`, so a QAT-trained
    weight lands on exactly the grid the export writes.
  * activations: int8, asymmetric, dynamic per token (scale + zero point computed per call
    for each token's row; torchao's QAT fake quantizer implements only the asymmetric
    per-token variant, so the export follows it).

Fast path: fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`, the kernel
behind `torch.ao` dynamic quantization). Measured on this 2-core AVX2 CPU at batch 1 it ran
SmolLM2 shapes 2–8× faster than fp32 (the 576×49152 lm_head 8.6×); torchao's CPU paths
(`torch._weight_int8pack_mm`, `torch._int_mm`) were 10–100× *slower* than fp32 here. No library
exposes fbgemm with a plain (int8 weight, scale) interface, hence this small wrapper.

Numerics of the fast path differ slightly from the reference (dequantized weight, per-token
activation fake-quant): fbgemm quantizes activations per call with one asymmetric uint8 scale
over the whole (tokens, features) matrix, with `reduce_range` (7-bit) on x86 to avoid int16
overflow. So `Int8Linear` calls fbgemm once per token (decode: 1 to `max_fast_rows` rows) and
runs prefill-sized inputs through the reference (dequantized weight, per-token fake quant) in
fp32, where GEMMs are compute-bound anyway. `Int8Linear.reference` is that exact reference.

`serve` is a leaf package: torch only here, no transformers.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127
_EPS = torch.finfo(torch.float32).eps


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: weight (out, in) → (q int8 (out, in), scale fp32 (out, 1))."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / ((QMAX - QMIN) / 2)).clamp_min(_EPS)  # (out, 1)
    q = torch.clamp(torch.round(w / scale), QMIN, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    """int8 (out, in) × scale (out, 1) → fp32 (out, in)."""
    return q.float() * scale.float().reshape(-1, 1)


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """Asymmetric int8 per-token dynamic fake quant of activations x (..., features).

    scale = (max - min) / 255 over each token's row (range widened to include 0),
    zero_point = round(-128 - min / scale): compressed-tensors' dynamic `token` formula, and
    torchao's per-token QAT fake quantizer (which only implements the asymmetric variant).
    """
    lo = x.amin(dim=-1, keepdim=True).clamp_max(0)
    hi = x.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(QMIN - lo / scale), QMIN, QMAX)
    q = torch.clamp(torch.round(x / scale) + zero_point, QMIN, QMAX)
    return (q - zero_point) * scale


def fbgemm_available() -> bool:
    """True when this torch build has an x86 quantized engine (fbgemm / x86) selected or selectable."""
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("x86", "fbgemm"))


def _select_engine() -> bool:
    engines = torch.backends.quantized.supported_engines
    if torch.backends.quantized.engine in ("x86", "fbgemm"):
        return True
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            return True
    return False


class Int8Linear(nn.Module):
    """y = x · dequant(Wq)ᵀ + b with int8 weights; fbgemm dynamic int8 kernel when available.

    Build with `Int8Linear.from_int8(q (out, in) int8, scale (out,) or (out, 1), bias)` or
    `Int8Linear.from_float(linear)`. Holds only the packed int8 weight on the fast path
    (about a quarter of the fp32 bytes). `forward(x (..., in)) → (..., out)` fp32.
    """

    # fbgemm runs at most this many tokens per call (one call each); more rows take the
    # dequantized fp32 path (prefill). Decode batches up to this size stay on int8 kernels.
    max_fast_rows: int = 16

    def __init__(
        self, q: Tensor, scale: Tensor, bias: Tensor | None = None, fast: bool = True
    ) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Linear needs a 2-D int8 weight, got {q.dtype} {tuple(q.shape)}")
        scale = scale.detach().float().reshape(-1)
        if scale.numel() != q.shape[0]:
            raise ValueError(
                f"weight_scale has {scale.numel()} entries for {q.shape[0]} output channels"
            )
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self._packed = None
        if fast and _select_engine():
            with warnings.catch_warnings():  # quantized tensor dtypes are deprecated, fbgemm is not
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    q.contiguous(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
                )
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        else:
            if fast:
                log.warning("no fbgemm/x86 quantized engine; Int8Linear uses the reference path")
            self.register_buffer("qweight", q.contiguous())
            self.register_buffer("weight_scale", scale.reshape(-1, 1))

    @classmethod
    def from_int8(
        cls, q: Tensor, scale: Tensor, bias: Tensor | None = None, fast: bool = True
    ) -> Int8Linear:
        return cls(q, scale, bias, fast)

    @classmethod
    def from_float(cls, linear: nn.Linear, fast: bool = True) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias, fast)

    @property
    def is_fast(self) -> bool:
        return self._packed is not None

    def int8_weight(self) -> tuple[Tensor, Tensor]:
        """(q int8 (out, in), scale fp32 (out, 1))."""
        if self._packed is None:
            return self.qweight, self.weight_scale
        qw, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qw.int_repr(), qw.q_per_channel_scales().float().reshape(-1, 1)

    def dequantized_weight(self) -> Tensor:
        return dequantize_weight(*self.int8_weight())

    def reference(self, x: Tensor) -> Tensor:
        """The export's numerics: per-token int8 activation fake quant × dequantized weight."""
        return F.linear(fake_quantize_per_token(x.float()), self.dequantized_weight(), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()  # (tokens, in)
        if self._packed is None or rows.shape[0] > self.max_fast_rows:
            # Prefill: compute-bound, so fp32 GEMM on the dequantized weight loses little, and
            # fbgemm's single activation scale over many tokens wrecks accuracy (one outlier
            # token sets the range for all: measured perplexity 43.9 → 172.8 on the student).
            y = F.linear(fake_quantize_per_token(rows), self.dequantized_weight(), self.bias)
        elif rows.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(rows.contiguous(), self._packed, True)
        else:  # a few decode rows: one fbgemm call per token keeps per-token activation scales
            y = torch.cat(
                [torch.ops.quantized.linear_dynamic(r, self._packed, True) for r in rows.split(1)]
            )
        return y.reshape(*shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fast={self.is_fast}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one fp32 scale per row.

    forward(ids (...)) → (..., dim) fp32: only the looked-up rows are dequantized.
    """

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Embedding needs a 2-D int8 table, got {q.dtype}")
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("weight_scale", scale.detach().float().reshape(-1, 1))
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].float() * self.weight_scale[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def swap_in_int8(
    model: nn.Module,
    tensors: dict[str, Tensor],
    lm_head_from: str | None = None,
    fast: bool = True,
) -> list[str]:
    """Replace every nn.Linear / nn.Embedding of `model` whose `<name>.weight` in `tensors` is
    int8 (with `<name>.weight_scale`) by Int8Linear / Int8Embedding. Returns the swapped names.

    `tensors` is an export's state dict (compressed-tensors `int-quantized` layout).
    `lm_head_from="model.embed_tokens"` also runs a tied output head as an int8 linear over
    that int8 table (per-row scales are per-output-channel scales for the head).
    """
    swapped = []
    for name, module in list(model.named_modules()):
        weight = tensors.get(f"{name}.weight")
        if weight is None or weight.dtype != torch.int8:
            continue
        scale = tensors.get(f"{name}.weight_scale")
        if scale is None:
            raise KeyError(f"{name}.weight is int8 but {name}.weight_scale is missing")
        if isinstance(module, nn.Linear):
            bias = tensors.get(f"{name}.bias", module.bias)
            _set_submodule(model, name, Int8Linear(weight, scale, bias, fast))
        elif isinstance(module, nn.Embedding):
            _set_submodule(model, name, Int8Embedding(weight, scale))
        else:
            continue
        swapped.append(name)
    if lm_head_from is not None:
        head = "lm_head"
        weight = tensors.get(f"{lm_head_from}.weight")
        if weight is None or weight.dtype != torch.int8:
            raise ValueError(f"lm_head_from={lm_head_from!r} is not an int8 table in the export")
        _set_submodule(
            model, head, Int8Linear(weight, tensors[f"{lm_head_from}.weight_scale"], None, fast)
        )
        swapped.append(head)
    return swapped
