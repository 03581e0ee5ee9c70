"""distill.quant's scheme: which modules are int8, the compressed-tensors config the export
writes (what transformers and vLLM read back), untying the head, and the config mapping."""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationStatus
from transformers import LlamaForCausalLM

from distill.models.tiny import tiny_llama_config
from distill.quant import (
    INT8_FORMAT,
    Int8Scheme,
    build_scheme,
    compressed_tensors_config,
    is_int8,
    prepare_qat,
    to_int8,
    untie_head,
)


def untied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=64, tie_word_embeddings=False)).eval()


def test_export_config_is_w8a8_channel_weights_and_dynamic_token_activations(tiny_llama):
    config = compressed_tensors_config(Int8Scheme(embeddings=True), tiny_llama)
    assert config.format == INT8_FORMAT == "int-quantized"
    assert config.quantization_status == QuantizationStatus.FROZEN
    assert config.ignore == []
    linear, table = config.config_groups["linear"], config.config_groups["embeddings"]
    assert linear.targets == ["Linear"] and table.targets == ["Embedding"]
    assert linear.format == table.format == INT8_FORMAT
    for weights in (linear.weights, table.weights):
        assert (weights.num_bits, weights.type, weights.symmetric) == (8, "int", True)
        assert weights.strategy == "channel" and not weights.dynamic
    acts = linear.input_activations
    assert (acts.num_bits, acts.type, acts.symmetric) == (8, "int", False)
    assert acts.strategy == "token" and acts.dynamic is True
    assert table.input_activations is None  # token ids: nothing to quantize


def test_export_config_ignores_exactly_what_the_scheme_leaves_in_fp32(tiny_llama):
    plain = compressed_tensors_config(Int8Scheme(embeddings=False), tiny_llama)
    assert set(plain.config_groups) == {"linear"}
    assert sorted(plain.ignore) == ["lm_head", "model.embed_tokens"]
    scheme = Int8Scheme(embeddings=True, exclude=[r"layers\.0\.mlp", r"\.k_proj$"])
    excluded = compressed_tensors_config(scheme, tiny_llama)
    expected = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    expected += [f"model.layers.{i}.self_attn.k_proj" for i in range(4)]
    assert sorted(excluded.ignore) == sorted(expected)
    assert "model.embed_tokens" in scheme.embedding_names(tiny_llama)
    assert Int8Scheme(embeddings=True, exclude=["embed"]).embedding_names(tiny_llama) == []


def test_untied_head_follows_lm_head_not_embeddings():
    model = untied_llama()
    names = lambda **kw: Int8Scheme(**kw).linear_names(model)  # noqa: E731
    assert "lm_head" in names(embeddings=False, lm_head=True)
    assert "lm_head" not in names(embeddings=True, lm_head=False)
    assert len(names(lm_head=False)) == 4 * 7


def test_untie_head_copies_the_table_once(tiny_llama):
    table = tiny_llama.model.embed_tokens.weight
    assert tiny_llama.lm_head.weight is table
    untie_head(tiny_llama)
    head = tiny_llama.lm_head.weight
    assert head is not table and torch.equal(head, table)
    assert tiny_llama.config.tie_word_embeddings is False
    assert tiny_llama.config.get_text_config().tie_word_embeddings is False
    untie_head(tiny_llama)  # already untied: nothing changes
    assert tiny_llama.lm_head.weight is head
    # the int8 scheme now sees an untied head: `lm_head` decides, not `embeddings`
    assert "lm_head" in Int8Scheme(embeddings=False).linear_names(tiny_llama)


def test_untie_head_leaves_an_untied_model_alone():
    model = untied_llama()
    head = model.lm_head.weight
    untie_head(model)
    assert model.lm_head.weight is head and model.config.tie_word_embeddings is False


def test_is_int8_only_after_conversion(tiny_llama):
    assert not is_int8(tiny_llama)
    assert is_int8(to_int8(tiny_llama, Int8Scheme(embeddings=False)))


def test_build_scheme_reads_each_key_and_defaults_like_the_dataclass():
    assert build_scheme({}) == Int8Scheme()
    assert build_scheme({}).lm_head is True and build_scheme({"exclude": None}).exclude == []
    scheme = build_scheme({"embeddings": 1, "lm_head": 0, "exclude": ("a", "b")})
    assert scheme == Int8Scheme(embeddings=True, lm_head=False, exclude=["a", "b"])
    assert build_scheme({"embeddings": 0}).embeddings is False


def test_untie_head_clears_the_flag_on_a_vlms_text_config_too():
    """Idefics3 keeps `tie_word_embeddings` on its nested text config as well: both must say
    False, or a loader re-ties the int8 head to the table."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=16,
        ),
        text_config=dict(
            model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            tie_word_embeddings=True,
        ),
        image_token_id=60, scale_factor=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(config)
    text = model.config.get_text_config()
    assert text is not model.config and text.tie_word_embeddings is True
    untie_head(model)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False and text.tie_word_embeddings is False


def test_qat_fake_quantizes_linear_inputs_per_token_and_weights_per_channel(tiny_llama):
    """QAT must see what the export runs: int8 per-token asymmetric activations and int8
    per-channel symmetric weights on every scheme Linear; tables get weights only."""
    from torchao.quantization import MappingType, PerAxis, PerToken

    names = prepare_qat(tiny_llama, Int8Scheme(embeddings=True))
    assert "model.layers.3.mlp.down_proj" in names and "model.embed_tokens" in names
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    act, weight = q_proj.activation_fake_quantizer.config, q_proj.weight_fake_quantizer.config
    assert (act.dtype, act.granularity, act.mapping_type) == (
        torch.int8, PerToken(), MappingType.ASYMMETRIC,
    )  # fmt: skip
    assert (weight.dtype, weight.granularity, weight.mapping_type) == (
        torch.int8, PerAxis(axis=0), MappingType.SYMMETRIC,
    )  # fmt: skip
    table = tiny_llama.model.embed_tokens
    assert type(table).__name__ == "FakeQuantizedEmbedding"
    assert table.weight_fake_quantizer.config.mapping_type == MappingType.SYMMETRIC
