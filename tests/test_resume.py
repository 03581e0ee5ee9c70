"""Interrupted + resumed training == uninterrupted training: same steps, same batches, same weights.

Lightning alone does not give this: with a plain shuffled DataLoader a mid-epoch resume restarts
the epoch's iteration (and a seeded generator restarts at epoch 0's order). ResumableLoader
stores (epoch, batches served) in the checkpoint and orders epoch e by (seed, e).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaForCausalLM

from distill.data.resumable import ResumableLoader
from distill.data.text import TextDataModule
from distill.losses import KDLoss
from distill.models.tiny import tiny_llama_config
from distill.module import DistillModule

VOCAB = 128


def batches(loader) -> list[list[int]]:
    return [batch[0][:, 0].tolist() for batch in loader]


def test_loader_resumes_on_the_next_unseen_batch_and_reorders_each_epoch():
    data = TensorDataset(torch.arange(20).unsqueeze(1))
    loader = ResumableLoader(data, batch_size=3, seed=7)
    epoch0 = batches(loader)
    assert len(epoch0) == 6 and sorted(sum(epoch0, [])) != list(range(18))  # shuffled, drop_last
    assert batches(ResumableLoader(data, batch_size=3, seed=7)) == epoch0  # seeded
    loader.sampler.set_epoch(1)
    epoch1 = batches(loader)
    assert epoch1 != epoch0

    interrupted = ResumableLoader(data, batch_size=3, seed=7)
    interrupted.sampler.set_epoch(1)
    it = iter(interrupted)
    seen = [next(it)[0][:, 0].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = ResumableLoader(data, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch after restoring loader state
    assert seen + batches(resumed) == epoch1
    assert batches(resumed) == epoch1  # the skip applies to the resumed pass only


def test_plain_seeded_dataloader_is_what_lightning_would_replay():
    """The problem being solved: a fresh seeded DataLoader restarts at epoch 0's order."""
    data = TensorDataset(torch.arange(12).unsqueeze(1))

    def plain():
        generator = torch.Generator().manual_seed(7)
        return DataLoader(data, batch_size=3, shuffle=True, generator=generator)

    loader = plain()
    first, second = batches(loader), batches(loader)
    assert first != second and batches(plain()) == first  # epoch 1 after resume == epoch 0


class Recorder(L.Callback):
    """Records the first token of each sample per step; optionally stops at `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[list[int]] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch[0][:, 0].tolist())
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def make_module(on_policy_fraction: float = 0.0) -> DistillModule:
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=2))
    torch.manual_seed(1)
    student = LlamaForCausalLM(
        tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=32)
    )
    loss = KDLoss(on_policy_fraction=on_policy_fraction)
    return DistillModule(student, teacher, loss, lr=1e-2, warmup_steps=2)


def make_data() -> TextDataModule:
    data = TextDataModule(tokenizer=None, seq_len=8, batch_size=2, seed=3)
    generator = torch.Generator().manual_seed(0)
    data.blocks = {
        split: torch.randint(0, VOCAB, (10, 8), generator=generator)
        for split in ("train", "validation", "test")
    }
    data.blocks["train"][:, 0] = torch.arange(10)  # block id in the first token
    return data


def fit(
    tmp_path, max_steps: int, recorder: Recorder, ckpt_path=None, on_policy_fraction: float = 0.0
) -> DistillModule:
    module = make_module(on_policy_fraction)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpoint, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        deterministic=True,
    )
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps if recorder.stop_at is None else True
    return module


@pytest.mark.parametrize("on_policy", [0.0, 0.5], ids=["off-policy", "gkd-on-policy"])
@pytest.mark.parametrize("stop_at", [3, 5, 7], ids=["mid-epoch-0", "epoch-end", "mid-epoch-1"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, stop_at, on_policy):
    """5 batches per epoch, 9 steps: interrupts mid-epoch, at an epoch end and in epoch 1.
    On-policy (GKD) batches sample from the student: the resumed run must sample the same."""
    full = Recorder()
    reference = fit(tmp_path / "full", 9, full, on_policy_fraction=on_policy)

    first = Recorder(stop_at=stop_at)
    fit(tmp_path / "run", 9, first, on_policy_fraction=on_policy)
    ckpt = tmp_path / "run" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == stop_at
    second = Recorder()
    resumed = fit(tmp_path / "run", 9, second, ckpt_path=ckpt, on_policy_fraction=on_policy)

    assert first.seen + second.seen == full.seen  # same batches, in the same order
    assert len(full.seen) == 9 and full.seen[:5] != full.seen[5:]
    for name, weight in reference.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[name], weight, msg=name)
