"""distill.quant: torchao QAT fake quant on the export's int8 grid, PTQ/QAT in the train pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distill.quant import (
    Int8Scheme,
    build_scheme,
    compressed_tensors_config,
    finish_qat,
    is_int8,
    prepare_qat,
    to_int8,
)
from serve.int8 import dequantize_weight, quantize_weight


def load_quant_yaml(name: str = "qat-int8"):
    from omegaconf import OmegaConf

    from distill.paths import configs_dir

    return OmegaConf.load(configs_dir() / "quant" / f"{name}.yaml")


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def test_scheme_selects_modules(tiny_llama):
    all_linears = 4 * 7
    assert (
        len(Int8Scheme(embeddings=True).linear_names(tiny_llama)) == all_linears + 1
    )  # tied head follows table
    assert Int8Scheme(embeddings=True).embedding_names(tiny_llama) == ["model.embed_tokens"]
    no_tables = Int8Scheme(embeddings=False)
    assert "lm_head" not in no_tables.linear_names(tiny_llama)
    assert no_tables.embedding_names(tiny_llama) == []
    excluded = Int8Scheme(embeddings=True, exclude=[r"mlp\.down_proj"]).linear_names(tiny_llama)
    assert len(excluded) == all_linears + 1 - 4 and not any("down_proj" in n for n in excluded)
    # the default (and configs/quant/*.yaml's): fp32 table and tied head, what vLLM loads
    assert Int8Scheme() == no_tables == build_scheme({}) == build_scheme(load_quant_yaml())
    config = compressed_tensors_config(no_tables, tiny_llama)
    assert set(config.ignore) == {"lm_head", "model.embed_tokens"}


def test_qat_fake_quant_uses_the_export_grid(tiny_llama):
    prepare_qat(tiny_llama, Int8Scheme(embeddings=True))
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "FakeQuantizedLinear"
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        fake = q_proj.weight_fake_quantizer(q_proj.weight)
    _assert_same_grid(fake, q_proj.weight)
    table = tiny_llama.model.embed_tokens
    with torch.no_grad():
        fake_table = table.weight_fake_quantizer(table.weight)
    _assert_same_grid(fake_table, table.weight)


def test_qat_without_tables_leaves_the_head_and_table_in_float(tiny_llama):
    """embeddings=false (the default): only the decoder Linears get fake quantizers; the tied
    head and the embedding table train in float, as the export keeps them."""
    scheme = Int8Scheme(embeddings=False)
    names = prepare_qat(tiny_llama, scheme)
    fake = {n for n, m in tiny_llama.named_modules() if "FakeQuantized" in type(m).__name__}
    assert fake == set(names) == set(scheme.linear_names(tiny_llama)) and len(fake) == 4 * 7
    assert type(tiny_llama.lm_head) is torch.nn.Linear
    assert type(tiny_llama.model.embed_tokens) is torch.nn.Embedding


def _assert_same_grid(fake: torch.Tensor, weight: torch.Tensor) -> None:
    """torchao's fake quant == our int8 grid, up to one step on rare round-half ties."""
    q, scale = quantize_weight(weight)
    steps = (fake - dequantize_weight(q, scale)).abs() / scale
    assert steps.max() <= 1.0 + 1e-4
    assert (steps > 1e-3).float().mean() < 0.005


@pytest.mark.parametrize("embeddings", [True, False])
def test_qat_model_matches_converted_int8_model(tiny_llama, embeddings):
    """What QAT trains is what the export runs: fake-quant logits ≈ converted int8 logits."""
    scheme = Int8Scheme(embeddings=embeddings)
    ids = _ids()
    with torch.no_grad():
        fp32 = tiny_llama(ids).logits
    qat = copy.deepcopy(tiny_llama)
    prepare_qat(qat, scheme)
    with torch.no_grad():
        fake = qat(ids).logits
    converted = to_int8(finish_qat(qat), scheme)
    assert is_int8(converted) and not any(
        "FakeQuantized" in type(m).__name__ for m in qat.modules()
    )
    with torch.no_grad():
        real = converted(ids).logits
    scale = fp32.abs().max()
    # torchao and compressed-tensors round the per-token zero point at different places
    assert (fake - real).abs().max() < 0.02 * scale
    assert 0 < (real - fp32).abs().max() < 0.1 * scale  # quantized, and still the same model
    head_is_int8 = hasattr(converted.lm_head, "quantization_scheme")
    assert head_is_int8 == embeddings
    assert converted.lm_head.weight is not converted.model.embed_tokens.weight or not embeddings


def test_ptq_puts_weights_on_int8_grid(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.up_proj.weight.detach().clone()
    to_int8(tiny_llama, Int8Scheme(embeddings=True))
    module = tiny_llama.model.layers[1].mlp.up_proj
    q = torch.round(module.weight / module.weight_scale)
    torch.testing.assert_close(module.weight, q * module.weight_scale)
    assert q.abs().max() <= 128
    assert (module.weight - w).abs().max() <= module.weight_scale.max() / 2 + 1e-6


@pytest.mark.slow
def test_train_pipeline_runs_ptq_and_qat(tmp_path, tiny_teacher_dir):
    from test_train import only_run_dir, run_train

    result = run_train(
        tmp_path,
        tiny_teacher_dir,
        "trainer.max_steps=2",
        "quant=qat-int8",
        "quant.steps=3",
        "quant.lr=1e-3",
    )
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for label in ("student (distilled)", "student (ptq int8)", "student (qat int8)"):
        assert label in metrics["models"], result.stdout[-2000:]
    assert metrics["stage_seconds"]["quant"] > 0
    assert "train/loss" in (run_dir / "metrics-qat" / "metrics.csv").read_text()

    from safetensors.torch import load_file

    qat = load_file(run_dir / "student-qat" / "model.safetensors")
    ptq = load_file(run_dir / "student-ptq" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert qat[name].dtype == torch.int8 and f"{name}_scale" in qat
    assert not torch.equal(qat[name], ptq[name])  # QAT trained the weights
    config = json.loads((run_dir / "student-qat" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
