"""DistillModule on tiny models: every teacher signal trains, vocab checks, hidden-state KD."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from transformers import LlamaForCausalLM

from distill.data.text import TextDataModule
from distill.hidden_kd import HiddenStateKD, kept_layers_from, layer_pairs
from distill.losses import IGNORE_INDEX, KDLoss
from distill.models.tiny import tiny_llama_config
from distill.module import DistillModule
from distill.vocab import shared_vocab_size

VOCAB = 256


def tiny(seed: int, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**{"vocab_size": VOCAB, **config}))


def block_data(num_blocks: int = 12, seq_len: int = 16, batch_size: int = 2) -> TextDataModule:
    """A TextDataModule with random token blocks preset (setup() keeps them)."""
    data = TextDataModule(tokenizer=None, seq_len=seq_len, batch_size=batch_size)
    generator = torch.Generator().manual_seed(0)
    data.blocks = {
        split: torch.randint(0, VOCAB, (num_blocks, seq_len), generator=generator)
        for split in ("train", "validation", "test")
    }
    return data


def fit(module: DistillModule, data, steps: int = 2, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def changed(before: dict, model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "loss_kwargs",
    [
        {"kind": "forward_kl"},
        {"kind": "reverse_kl", "ce_weight": 0.5, "chunk_size": 7},
        {"kind": "jsd", "on_policy_fraction": 1.0},
        {"kind": "forward_kl", "hidden_weight": 1.0, "hidden_loss": "cosine"},
    ],
    ids=["fkl", "rkl+ce-chunked", "gkd-on-policy", "hidden-cosine"],
)
def test_student_trains_from_live_teacher(loss_kwargs):
    teacher = tiny(0)
    student = tiny(1, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)  # narrower
    loss = KDLoss(**loss_kwargs)
    pairs = layer_pairs(2, 4, kept_layers=[0, 3])
    module = DistillModule(student, teacher, loss, hidden_pairs=pairs, lr=1e-2)
    before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())
    trainer = fit(module, block_data())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/kd"] > 0
    assert changed(before, student)
    assert not changed(teacher_before, teacher)  # frozen
    assert not any(k.startswith("_teacher") for k in module.state_dict())  # not checkpointed
    if loss.hidden_weight:
        assert metrics["train/hidden"] > 0
        assert isinstance(module.hidden_kd.projections[0], torch.nn.Linear)  # 32 → 64


def test_on_policy_batches_are_student_samples_scored_only_on_sampled_tokens():
    student, teacher = tiny(1), tiny(0)
    module = DistillModule(student, teacher, KDLoss(kind="jsd", on_policy_fraction=0.5), seed=3)
    ids = torch.randint(0, VOCAB, (2, 10))
    sampled, labels = module.sample_continuations(ids, step=0)
    assert sampled.shape == ids.shape and torch.equal(sampled[:, :5], ids[:, :5])
    assert (labels[:, :4] == IGNORE_INDEX).all() and (labels[:, 4:-1] == sampled[:, 5:]).all()
    choices = [module.on_policy_now(step) for step in range(400)]
    assert 0.4 < sum(choices) / len(choices) < 0.6  # λ of the batches
    assert choices == [module.on_policy_now(step) for step in range(400)]  # resume-stable
    off = DistillModule(student, teacher, KDLoss(kind="jsd"))
    with pytest.raises(ValueError, match="live teacher"):
        DistillModule(student, None, KDLoss(on_policy_fraction=0.5))
    assert not any(off.on_policy_now(step) for step in range(50))


def test_plain_ce_baseline_without_teacher_and_8bit_adamw():
    student = tiny(1, num_hidden_layers=2)
    before = copy.deepcopy(student.state_dict())
    module = DistillModule(student, None, KDLoss(), optimizer="adamw8bit", lr=1e-2)
    trainer = fit(module, block_data())
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert "train/kd" not in trainer.callback_metrics and trainer.callback_metrics["train/ce"] > 0
    assert changed(before, student)
    with pytest.raises(ValueError, match="unknown optimizer"):
        DistillModule(student, None, KDLoss(), optimizer="sgd")


def test_layer_pairs_follow_pruning_or_depth_proportion(tmp_path):
    assert layer_pairs(3, 6, kept_layers=[0, 2, 5]) == [(1, 1), (2, 3), (3, 6)]
    assert layer_pairs(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_pairs(1, 4) == [(1, 4)]
    with pytest.raises(ValueError, match="kept_layers"):
        layer_pairs(2, 6, kept_layers=[0, 1, 2])
    assert kept_layers_from(tmp_path) is None
    (tmp_path / "prune.json").write_text('{"kept_layers": [0, 4]}')
    assert kept_layers_from(tmp_path) == [0, 4]


def test_hidden_kd_mse_matches_direct_computation_through_projection():
    torch.manual_seed(0)
    kd = HiddenStateKD([(1, 2), (2, 4)], student_width=8, teacher_width=12, kind="mse")
    s = tuple(torch.randn(2, 5, 8) for _ in range(3))
    t = tuple(torch.randn(2, 5, 12) for _ in range(5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    p0, p1 = kd.projections
    expected = (
        ((p0(s[1][:, :-1]) - t[2][:, :-1]) ** 2).mean()
        + ((p1(s[2][:, :-1]) - t[4][:, :-1]) ** 2).mean()
    ) / 2
    torch.testing.assert_close(kd(s, t, mask), expected)
    same = HiddenStateKD([(1, 1)], 8, 8)
    assert isinstance(same.projections[0], torch.nn.Identity)


def test_vocabulary_checks(tokenizer):
    assert shared_vocab_size(tokenizer, tokenizer, 49152, 49216) == 49152  # padding rows only
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<nanodistill-extra>"])
    with pytest.raises(ValueError, match="same tokenizer"):
        shared_vocab_size(tokenizer, other, 49152, 49153)
    with pytest.raises(ValueError, match="output rows"):
        shared_vocab_size(tokenizer, tokenizer, 49152, 1000)
    with pytest.raises(ValueError, match="vocab_size"):  # rows differ and nobody checked
        DistillModule(tiny(1, vocab_size=VOCAB + 8), tiny(0), KDLoss())


def test_padded_student_vocab_is_sliced_to_the_shared_size():
    """Student with 8 padding rows: KD runs over the first VOCAB columns only."""
    student = tiny(1, vocab_size=VOCAB + 8, num_hidden_layers=2)
    module = DistillModule(student, tiny(0), KDLoss(), vocab_size=VOCAB, lr=1e-2)
    trainer = fit(module, block_data(), steps=1)
    assert torch.isfinite(trainer.callback_metrics["train/kd"])


def _compose(*overrides: str):
    from distill.hydra_app import compose_recipe

    return compose_recipe(overrides=overrides)


def test_train_wiring_rejects_a_student_with_another_tokenizer(tmp_path, tokenizer):
    """`student.init=pretrained` with a different tokenizer fails in build_module, before fit."""
    from distill.kd_setup import build_module

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<nanodistill-extra>"])
    other.save_pretrained(tmp_path / "student")
    tiny(1, vocab_size=len(other)).save_pretrained(tmp_path / "student")
    cfg = _compose("student.init=pretrained", f"student.name_or_path={tmp_path / 'student'}")
    data = block_data()
    data.tokenizer = tokenizer
    with pytest.raises(ValueError, match="same tokenizer"):
        build_module(cfg, tiny(0), tiny(1), data, tmp_path)


def test_train_wiring_maps_hidden_pairs_from_prune_json(tmp_path, tokenizer):
    from distill.kd_setup import build_module

    (tmp_path / "student-init").mkdir()
    (tmp_path / "student-init" / "prune.json").write_text('{"kept_layers": [0, 2]}')
    data = block_data()
    data.tokenizer = tokenizer
    big = {"vocab_size": len(tokenizer)}
    module, datamodule = build_module(
        _compose("loss=hidden"), tiny(0, **big), tiny(1, num_hidden_layers=2, **big), data, tmp_path
    )
    assert module.hidden_kd.pairs == [(1, 1), (2, 4)] and datamodule is data
    assert module.vocab_size == len(tokenizer)
