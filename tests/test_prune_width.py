"""Width + depth slicing across families: identity, valid smaller models, HF round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.models.loading import count_parameters
from distill.prune.importance import calibration_scores
from distill.prune.plan import Dims, head_dim_of, make_plan
from distill.prune.slicing import config_problem, parameters_for, slice_model

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False)),  # q/k/v biases
    "mistral": (
        MistralForCausalLM,
        MistralConfig,
        dict(tie_word_embeddings=False, sliding_window=8),
    ),
}


def build(family: str):
    cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_cls(**COMMON, **extra)).eval()
    if family == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def scores_and_plan(model, dims: Dims, ids):
    scores = calibration_scores(model, [ids], progress=False)
    return make_plan(scores, Dims.of(model.config), dims, head_dim_of(model.config))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_to_teacher_dims_gives_teacher_logits(family):
    teacher = build(family)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    student = slice_model(teacher, scores_and_plan(teacher, Dims.of(teacher.config), ids)).eval()
    assert type(student) is type(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_prunes_to_valid_smaller_model(family, tmp_path):
    teacher = build(family)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    dims = Dims(num_hidden_layers=3, hidden_size=48, intermediate_size=96,
                num_attention_heads=4, num_key_value_heads=1)  # fmt: skip
    plan = scores_and_plan(teacher, dims, ids)
    student = slice_model(teacher, plan).eval()
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (3, 48, 96)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 8)
    assert count_parameters(student) == parameters_for(teacher, dims) < count_parameters(teacher)
    assert config.tie_word_embeddings == teacher.config.tie_word_embeddings
    if config.tie_word_embeddings:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    # Sliced weights are the teacher's: rows of kept neurons/heads, columns of kept channels.
    old, new = plan.layers[1], student.model.layers[1]
    up = teacher.model.layers[old].mlp.up_proj.weight[plan.neurons[1]][:, plan.channels]
    torch.testing.assert_close(new.mlp.up_proj.weight, up)
    if family == "qwen2":
        rows = [h * 8 + j for h in plan.kv_heads[1] for j in range(8)]
        torch.testing.assert_close(
            new.self_attn.k_proj.bias, teacher.model.layers[old].self_attn.k_proj.bias[rows]
        )
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert logits.shape == (2, 24, 256) and torch.isfinite(logits).all()
    # A standard HF checkpoint: reloads through the Auto class with identical outputs.
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(teacher)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


def test_per_layer_config_lists_follow_depth_pruning():
    types = ["full_attention", "sliding_attention"] * 2
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(**COMMON, layer_types=types, use_sliding_window=True, sliding_window=8)
    ).eval()
    ids = torch.randint(0, 256, (1, 16))
    plan = scores_and_plan(teacher, Dims.of(teacher.config).replace(num_hidden_layers=2), ids)
    student = slice_model(teacher, plan)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in plan.layers]


def test_unsupported_family_is_a_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'.*llama, mistral, qwen2"):
        calibration_scores(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (dict(hidden_size=65), "hidden_size=65 must be in 1..64"),
        (dict(num_attention_heads=5, num_key_value_heads=2), "multiple of num_key_value_heads"),
        (dict(num_attention_heads=8, num_key_value_heads=1), "only 4"),
    ],
)
def test_invalid_targets_are_clear_errors(dims, message):
    teacher = Dims.of(build("llama").config)
    with pytest.raises(ValueError, match=message):
        teacher.replace(**dims).check_within(teacher)


def test_family_config_validation_is_enforced():
    """LlamaConfig insists hidden_size % num_attention_heads == 0 even with head_dim set."""
    teacher = build("llama")
    dims = Dims.of(teacher.config).replace(hidden_size=60)  # 60 % 8 heads != 0
    assert "not a multiple" in config_problem(teacher.config, dims)
    assert config_problem(build("qwen2").config, dims) is None  # Qwen2 does not require it
    plan = make_plan(
        calibration_scores(teacher, [torch.zeros(1, 4, dtype=torch.long)], progress=False),
        Dims.of(teacher.config),
        dims,
        8,
    )
    with pytest.raises(ValueError, match="invalid for llama.*not a multiple"):
        slice_model(teacher, plan)
