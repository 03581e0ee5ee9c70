"""QAT and the export share one int8 weight rule: torchao's fake quantizer, bit for bit.

`serve.int8.quantize_weight` (PTQ, the export, the runtime) must put every weight exactly where
torchao's per-channel symmetric int8 fake quantizer (what QAT trains against) puts it,
including the ties w/scale = ±k.5 that a divide-then-round rule sends to the other integer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from distill.quant import Int8Scheme, _fake_quant_configs, prepare_qat, save_int8, to_int8
from serve.int8 import dequantize_weight, quantize_weight


def torchao_fake_quant(weight: torch.Tensor) -> torch.Tensor:
    """The weight as QAT sees it: torchao's IntxFakeQuantizer with the QAT path's config."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    _, weight_config = _fake_quant_configs()
    with torch.no_grad():
        return IntxFakeQuantizer(weight_config)(weight)


def export_grid(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the export writes it, in the weight's dtype."""
    return dequantize_weight(*quantize_weight(weight)).to(weight.dtype)


def tie_rows(rows: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows whose values sit on half steps of the grid: ±max|w| (w/scale = ±127.5) and (k + ½)·scale."""
    g = torch.Generator().manual_seed(seed)
    peak = torch.rand(rows, 1, generator=g) * 0.2 + 1e-3  # (rows, 1)
    scale = peak / 127.5
    k = torch.randint(-127, 127, (rows, cols - 2), generator=g).float()
    return torch.cat([peak, -peak, (k + 0.5) * scale], dim=1)  # (rows, cols)


def test_ties_are_real_and_the_rules_agree_on_them():
    w = tie_rows()
    q, scale = quantize_weight(w)
    by_division = torch.clamp(torch.round(w / scale), -128, 127)
    # the constructed ties do split a divide-then-round rule from torchao's
    assert (by_division != q.float()).sum() > 100
    fake = torchao_fake_quant(w)
    assert torch.equal(fake, export_grid(w))
    assert torch.equal(fake, q.float() * scale)  # dequantize_weight is plain q · scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (37, 1000)])
def test_random_weights_match_torchao_exactly(shape, dtype):
    torch.manual_seed(shape[0])
    for std in (0.02, 1.0, 30.0):
        w = (torch.randn(shape) * std).to(dtype)
        fake = torchao_fake_quant(w)
        assert fake.dtype == dtype
        assert torch.equal(fake, export_grid(w)), f"std={std}: {(fake != export_grid(w)).sum()}"


def test_degenerate_rows_match_torchao():
    """All-zero rows and rows far below fp32 eps · 127.5 use torchao's smallest-normal floor."""
    w = torch.randn(6, 32)
    w[0] = 0
    w[1] *= 1e-9
    w[2] *= 1e-30
    w[3, :] = 0
    w[3, 5] = -2e-7  # a single negative weight sets the scale
    assert torch.equal(torchao_fake_quant(w), export_grid(w))
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6, 1)
    assert int(q[3, 5]) == -128  # -127.5 rounds half to even


def test_qat_weights_land_on_the_exported_int8_grid(tiny_llama, tmp_path):
    """End to end: fake-quantized weights after prepare_qat == to_int8's weights == q·scale on disk."""
    ties = 0
    with torch.no_grad():  # every row holds +max and -max: w/scale = ±127.5, the tie case
        for p in tiny_llama.parameters():
            if p.dim() == 2:
                peak = p.abs().amax(dim=1)
                p[:, 0], p[:, 1] = peak, -peak
                q, scale = quantize_weight(p)
                ties += int((torch.round(p / scale).clamp(-128, 127) != q).sum())
    assert ties > 0  # a divide-then-round export would have disagreed with QAT here
    scheme = Int8Scheme(embeddings=True)
    qat = copy.deepcopy(tiny_llama)
    names = prepare_qat(qat, scheme)
    converted = to_int8(copy.deepcopy(tiny_llama), scheme)
    for name in names:
        module = qat.get_submodule(name)
        with torch.no_grad():
            fake = module.weight_fake_quantizer(module.weight)
        assert torch.equal(fake, converted.get_submodule(name).weight), name
    out = save_int8(copy.deepcopy(converted), tmp_path / "int8")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)
    checked = 0
    for name in names:
        weight = tiny_llama.get_submodule(name).weight
        q, scale = quantize_weight(weight)
        assert torch.equal(tensors[f"{name}.weight"], q), name
        assert torch.equal(tensors[f"{name}.weight_scale"].float().reshape(-1, 1), scale), name
        checked += 1
    assert checked == len(names) > 10
