"""serve.int8: the int8 grid, the fast fbgemm linear vs its dequantized reference, module swaps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serve.int8 import (
    Int8Embedding,
    Int8Linear,
    dequantize_weight,
    fake_quantize_per_token,
    fbgemm_available,
    full_range_int8_exact,
    quantize_weight,
    swap_in_int8,
)


def test_quantize_weight_is_per_row_symmetric_int8():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.linspace(0.01, 3.0, 16)[:, None]  # rows of very different range
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    assert torch.all(q.int().abs().amax(dim=1) >= 127)  # each row uses its full range
    err = (dequantize_weight(q, scale) - w).abs()
    assert torch.all(err <= scale / 2 + 1e-6)  # round-to-nearest: within half a step per row
    assert torch.equal(torch.round(dequantize_weight(q, scale) / scale).to(torch.int8), q)


def test_fake_quantize_per_token_is_per_row():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -50.0], [0.0, 2.0, 4.0]])
    y = fake_quantize_per_token(x)
    assert torch.allclose(y[0], x[0], atol=0.5 * 1.5 / 255)  # each row keeps its own scale
    assert torch.allclose(y[1], x[1], atol=0.5 * 150.0 / 255)
    assert y[2, 0] == 0.0  # zero is exactly representable (asymmetric range includes 0)


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no x86/fbgemm engine")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("full_range", [True, False], ids=["8bit", "7bit-split"])
def test_fast_linear_matches_per_token_reference(bias, full_range):
    """The fbgemm path computes the export's per-token numerics (to fp32 rounding), on both
    the VNNI (8-bit) and the AVX2 (7-bit split) variants, for a decode token and a prefill."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    fast = Int8Linear.from_float(linear)
    assert fast.is_fast
    if full_range and not full_range_int8_exact():
        pytest.skip("this CPU's fbgemm saturates 8-bit activations (no VNNI); the split runs")
    fast._full_range = full_range
    for rows in (1, 5, 40):
        x = torch.randn(rows, 1, 96)
        ref, out = fast.reference(x), fast(x)
        assert out.shape == (rows, 1, 80)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    q, scale = fast.int8_weight()  # the packed weight unpacks to the exact grid
    q_ref, scale_ref = quantize_weight(linear.weight)
    assert torch.equal(q, q_ref) and torch.allclose(scale, scale_ref)


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no x86/fbgemm engine")
@pytest.mark.parametrize("full_range", [True, False], ids=["8bit", "7bit-split"])
def test_fast_linear_is_batch_invariant(full_range):
    """A token's output is the same bits alone, with 1–39 other rows, or beside an outlier
    token 1000× larger (fbgemm's one-scale-per-call would let it set everyone's range)."""
    torch.manual_seed(0)
    fast = Int8Linear.from_float(nn.Linear(96, 80))
    if full_range and not full_range_int8_exact():
        pytest.skip("this CPU's fbgemm saturates 8-bit activations (no VNNI); the split runs")
    fast._full_range = full_range
    x = torch.randn(40, 96)
    x[0] *= 1000.0  # one outlier token
    alone = torch.cat([fast(x[i : i + 1]) for i in range(40)])
    for rows in (2, 9, 40):
        assert torch.equal(fast(x[:rows]), alone[:rows]), rows
    assert torch.equal(fast(x[1:]), alone[1:])  # without the outlier: unchanged
    err = (alone - fast.reference(x)).abs().amax(-1) / fast.reference(x).abs().amax(-1)
    assert err.max() < 1e-5


def test_reference_path_is_exact_dequantized_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    slow = Int8Linear.from_float(linear, fast=False)
    assert not slow.is_fast
    x = torch.randn(4, 32)
    q, scale = quantize_weight(linear.weight)
    expected = fake_quantize_per_token(x) @ dequantize_weight(q, scale).T + linear.bias
    torch.testing.assert_close(slow(x), expected)


def test_bad_int8_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="output channels"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))


def test_int8_embedding_dequantizes_looked_up_rows():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    q, scale = quantize_weight(table)
    emb = Int8Embedding(q, scale)
    ids = torch.tensor([[3, 7, 3]])
    torch.testing.assert_close(emb(ids), dequantize_weight(q, scale)[ids])


def test_swap_in_int8_runs_a_llama_on_int8_modules(tiny_llama):
    tensors = {}
    for name, module in tiny_llama.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding) and name != "lm_head":
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = quantize_weight(
                module.weight
            )
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    swapped = swap_in_int8(tiny_llama, tensors, lm_head_from="model.embed_tokens")
    assert "lm_head" in swapped and "model.embed_tokens" in swapped
    assert sum(isinstance(m, Int8Linear) for m in tiny_llama.modules()) == 4 * 7 + 1
    with torch.no_grad():
        out = tiny_llama(ids).logits
    assert out.shape == ref.shape
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


def test_swap_in_int8_requires_scales(tiny_llama):
    q, _ = quantize_weight(tiny_llama.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(KeyError, match="weight_scale"):
        swap_in_int8(tiny_llama, {"model.layers.0.self_attn.q_proj.weight": q})
