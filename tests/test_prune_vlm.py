"""Pruning a tiny Idefics3 through the family adapters: vision tower, LM and connector."""

from __future__ import annotations

import pytest
import torch

from distill.data.vqa import VQADataModule, trim_padding
from distill.models.vlm import build_vlm, parameter_counts
from distill.prune.vlm import language_model_view, prune_vlm, vision_dims

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,  # head_dim 16
    "image_size": 64,
    "patch_size": 16,
}


@pytest.fixture(scope="module")
def vlm_and_batches(tiny_teacher_dir):
    model, processor = build_vlm(str(tiny_teacher_dir), VISION, seed=0)
    data = VQADataModule(processor, batch_size=4, validation_images=4, max_train_questions=12)
    data.setup()
    batches = list(data.train_dataloader())[:2]
    return model.eval(), batches


def logits(model, batch):
    b = trim_padding(batch)
    with torch.no_grad():
        return model(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits


def test_the_lm_view_is_the_vlms_own_modules(vlm_and_batches):
    model, _ = vlm_and_batches
    lm = language_model_view(model)
    assert lm.model is model.model.text_model and lm.lm_head is model.lm_head
    assert lm.config.model_type == "llama"


def test_pruning_to_the_teachers_own_shape_changes_nothing(vlm_and_batches):
    model, batches = vlm_and_batches
    student, record = prune_vlm(model, batches, {}, {})
    assert record["fraction"] == 1.0
    torch.testing.assert_close(logits(student, batches[0]), logits(model, batches[0]))


def test_pruned_vlm_has_the_target_shapes_and_runs(vlm_and_batches):
    model, batches = vlm_and_batches
    vision = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}
    lm = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64}
    student, record = prune_vlm(model, batches, vision, lm)
    v, t = student.config.vision_config, student.config.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (
        2, 32, 2, 64
    )  # fmt: skip
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size) == (2, 48, 64)
    proj = student.model.connector.modality_projection.proj.weight
    assert proj.shape == (48, 32 * 4)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    counts, teacher = parameter_counts(student), parameter_counts(model)
    assert counts["vision"] < teacher["vision"] and counts["lm"] < teacher["lm"]
    assert record["student_parameters"] == counts["total"]
    out = logits(student, batches[0])
    assert out.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(out).all()
    # the connector keeps exactly the teacher's weights at the kept rows / columns
    v_kept = record["vision_channels"]
    assert len(v_kept) == 32
    cols = [k * 64 + c for k in range(4) for c in v_kept]  # 4 pixel-shuffle blocks of 64
    teacher_proj = model.model.connector.modality_projection.proj.weight
    assert torch.equal(proj, teacher_proj[record["lm_channels"]][:, cols])


def test_budget_prunes_the_lm_to_what_the_tower_leaves(vlm_and_batches):
    model, batches = vlm_and_batches
    student, record = prune_vlm(
        model, batches, {"num_hidden_layers": 2}, {}, params=0.6,
        search={"min_layers_fraction": 0.25, "min_hidden_fraction": 0.5, "tolerance": 0.2},
    )  # fmt: skip
    assert 0.6 * 0.8 <= record["fraction"] <= 0.6


def test_vision_width_must_be_whole_heads(vlm_and_batches):
    model, _ = vlm_and_batches
    config = model.model.vision_model.config
    assert vision_dims(config, {"hidden_size": 48}).num_attention_heads == 3
    unset = {"num_hidden_layers": None, "hidden_size": None, "intermediate_size": None}
    assert vision_dims(config, unset) == vision_dims(
        config, {}
    )  # the recipe's nulls: the teacher's
    assert vision_dims(config, {}).hidden_size == config.hidden_size
    with pytest.raises(ValueError, match="num_attention_heads × 16"):
        vision_dims(config, {"hidden_size": 40})


def test_token_distill_moves_a_pruned_towers_tokens_toward_the_teachers(vlm_and_batches):
    """vision_kd: a pruned tower + connector regress onto the teacher's image tokens (kept LM
    channels); the error falls and only the student's tower and connector change."""
    import copy

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from distill.vision_pretrain import TokenDistill, image_tokens

    model, batches = vlm_and_batches
    teacher = copy.deepcopy(model)
    vision = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}
    student, record = prune_vlm(teacher, batches, vision, {"hidden_size": 48})
    channels = record["lm_channels"]
    pixels = torch.cat([b["pixel_values"][:, 0] for b in batches])  # [images, 3, S, S]
    teacher_before = copy.deepcopy(teacher.state_dict())
    lm_before = copy.deepcopy(student.model.text_model.state_dict())

    def error():
        with torch.no_grad():
            t = image_tokens(teacher.model.vision_model, teacher.model.connector, pixels)
            s = image_tokens(student.model.vision_model, student.model.connector, pixels)
        return float((s - t[..., channels]).pow(2).mean() / t[..., channels].pow(2).mean())

    before = error()
    probe = TokenDistill(student, teacher, channels, lr=3e-3, warmup_steps=1)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, DataLoader(TensorDataset(pixels), batch_size=4, shuffle=True))
    assert error() < 0.5 * before
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    lm_after = student.model.text_model.state_dict()
    assert all(torch.equal(lm_after[k], v) for k, v in lm_before.items())
