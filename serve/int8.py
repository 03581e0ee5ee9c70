"""INT8 weights on CPU: the quantization grid, and fast int8 modules for exported checkpoints.

The scheme (shared by QAT, PTQ, the export and the runtime) is W8A8-int:
  * weights: int8, symmetric, one fp32 scale per output channel (per row of the weight);
    scale = max|w_row| / 127.5 (in the weight's dtype, at least its smallest normal),
    q = clamp(round_half_even(w · (1 / scale)), -128, 127): torchao's fake quantizer's rule,
    reproduced bit for bit by `quantize_weight` (multiplying by the reciprocal, not dividing:
    at w/scale = ±k.5 the two round to different integers), so a QAT-trained weight lands on
    exactly the grid the export writes (tests/test_int8_rounding.py pins it to torchao).
  * activations: int8, asymmetric, dynamic per token (scale + zero point computed per call
    for each token's row; torchao's QAT fake quantizer implements only the asymmetric
    per-token variant, so the export follows it).

Fast path, and why it is batch-invariant: fbgemm's dynamic int8 linear
(`torch.ops.quantized.linear_dynamic`, the kernel behind `torch.ao` dynamic quantization) picks
ONE activation scale for the whole (tokens, features) input, so a token's numerics would depend
on the other rows in its step (and one outlier token wrecks a long prefill: perplexity
43.9 → 172.8). We therefore quantize activations per token ourselves (the reference rule) and
hand fbgemm the integers with a fixed grid (scale 1, zero point 128: its
`linear_with_input_q_dq_qweight_dq_output_fp32` op), so its int32 accumulation computes
w_scale · (q_token · W_int8ᵀ) exactly for every row, whatever else the step holds. The
per-token scale and zero point are applied afterwards, row by row. Result:
the same bits for a token alone, batched with others, or in a prefill chunk of any size, and
within ~1e-5 of the fp32 reference. On CPUs whose int8 dot product saturates 16-bit pairs
(AVX2 without VNNI, where fbgemm needs 7-bit activations), each row is split into a 7-bit
high part and a 1-bit low part in the same call (twice the rows); `full_range_int8_exact`
probes which holds at first use. No library exposes fbgemm with a plain (int8 weight, scale,
per-token activation) interface, hence this small wrapper.

`serve` is a leaf package: torch only here, no transformers.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127
_EPS = torch.finfo(torch.float32).eps


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: weight (out, in) → (q int8 (out, in), scale fp32 (out, 1)).

    The one rounding rule of QAT and the export: torchao's `IntxFakeQuantizer` (int8,
    per_channel, symmetric; `choose_qparams_affine` + `_quantize_affine_no_dtype_cast`) step for
    step, so `dequantize_weight(*quantize_weight(w))` equals its fake-quantized `w` exactly.
    """
    w = weight.detach()
    w = w if w.is_floating_point() else w.float()
    amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1), in w's dtype as torchao computes it
    scale = (amax / ((QMAX - QMIN) / 2)).clamp_min(torch.finfo(w.dtype).smallest_normal).float()
    q = torch.clamp(torch.round(w.float() * (1.0 / scale)), QMIN, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    """int8 (out, in) × scale (out, 1) → fp32 (out, in)."""
    return q.float() * scale.float().reshape(-1, 1)


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int8 per-token dynamic quantization of activations x (tokens, features).

    Returns (q, scale, zero_point): q (tokens, features) holds integers in [-128, 127] as fp32,
    scale and zero_point are (tokens, 1); x ≈ (q - zero_point) · scale.
    scale = (max - min) / 255 over each token's row (range widened to include 0),
    zero_point = round(-128 - min / scale): compressed-tensors' dynamic `token` formula, and
    torchao's per-token QAT fake quantizer (which only implements the asymmetric variant).
    """
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    scale = (hi - lo).div_(QMAX - QMIN).clamp_(min=_EPS)
    zero_point = (lo / scale).neg_().add_(QMIN).round_().clamp_(QMIN, QMAX)  # QMIN - lo / scale
    q = (x / scale).round_().add_(zero_point).clamp_(QMIN, QMAX)
    return q, scale, zero_point


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """x (..., features) through per-token int8 quantization and back (see quantize_per_token)."""
    q, scale, zero_point = quantize_per_token(x.reshape(-1, x.shape[-1]))
    return ((q - zero_point) * scale).reshape(x.shape)


def _exact_int8_matmul(q: Tensor, packed, full_range: bool) -> Tensor:
    """w_scale · (q · W_int8ᵀ) for integer-valued q (rows, in) in [-128, 127], exactly.

    fbgemm is told the activation grid (scale 1, a fixed zero point) instead of choosing one
    from the rows, so every row's integers pass through unchanged (see the module docstring)."""
    linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    if full_range:  # uint8 = q + 128
        return linear(q, 1.0, -QMIN, packed)
    # 7-bit activations (no VNNI): u = q + 128 = 2·high + low, sent as uint8 high and 64 + low
    # (both ≤ 127) with zero point 64, so q = 2·(high - 64) + low.
    rows = q.shape[0]
    u = q + 128
    high = torch.div(u, 2, rounding_mode="floor")
    out = linear(torch.cat((high - 64, u - 2 * high)), 1.0, 64, packed)
    return 2 * out[:rows] + out[rows:]


def _pack(q: Tensor, scale: Tensor):
    """fbgemm's packed form of an int8 weight (out, in) with per-row scales (out,), no bias."""
    with warnings.catch_warnings():  # quantized tensor dtypes are deprecated, fbgemm is not
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(qw, None)


@functools.cache
def full_range_int8_exact() -> bool:
    """Whether fbgemm accumulates full-range uint8 × int8 products exactly on this CPU.

    True with VNNI (int32 dot products); False where pairs of products are summed in
    saturating int16 (AVX2), which the worst case below (255 · 127 · 2 > 32767) exposes."""
    if not _select_engine():
        return False
    q = torch.full((4, 64), QMAX, dtype=torch.int8)
    q[1] = QMIN
    packed = _pack(q, torch.ones(4))
    x = torch.full((2, 64), float(QMAX))
    x[1] = QMIN
    exact = x.double() @ q.double().T
    got = _exact_int8_matmul(x, packed, full_range=True).double()
    ok = torch.equal(got, exact)
    log.info("fbgemm int8: %s activations", "8-bit" if ok else "7-bit split (no VNNI)")
    return ok


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
    """y = x · dequant(Wq)ᵀ + b with int8 weights and per-token int8 activations.

    Build with `Int8Linear.from_int8(q (out, in) int8, scale (out,) or (out, 1), bias)` or
    `Int8Linear.from_float(linear)`. On the fast path it holds only the packed int8 weight
    (about a quarter of the fp32 bytes). `forward(x (..., in)) → (..., out)` fp32; a token's
    output does not depend on the other tokens in the call (see the module docstring).
    """

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
            self._packed = _pack(q, scale)
            self._full_range = full_range_int8_exact()
            # w_scale · Σ_k W_int8[j, k]: the zero point's share of each output, (out,)
            self.register_buffer("zero_point_weight", scale * q.float().sum(1), persistent=False)
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
        if self._packed is None:
            return self.reference(x)
        shape = x.shape
        q, scale, zero_point = quantize_per_token(x.reshape(-1, shape[-1]).float())
        acc = _exact_int8_matmul(q, self._packed, self._full_range)  # (tokens, out)
        y = acc.addcmul_(zero_point, self.zero_point_weight, value=-1).mul_(scale)
        if self.bias is not None:
            y = y.add_(self.bias)
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
