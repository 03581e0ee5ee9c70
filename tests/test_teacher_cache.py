"""Offline teacher cache: shard format, exact top-k, data pairing checks, training from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaForCausalLM

from distill.data.teacher_cache import (
    CachedTeacherDataset,
    CachedTrainData,
    read_meta,
    write_cache,
)
from distill.data.text import TextDataModule
from distill.losses import KDLoss
from distill.models.tiny import tiny_llama_config
from distill.module import DistillModule

VOCAB = 200


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()


@pytest.fixture
def blocks():
    return torch.randint(0, VOCAB, (7, 12), generator=torch.Generator().manual_seed(1))


def test_cache_holds_the_teachers_topk_in_fp16_int32_shards(tmp_path, teacher, blocks):
    meta = write_cache(
        teacher, blocks, tmp_path, k=5, temperature=2.0, batch_size=3, shard_blocks=4
    )
    assert [s["count"] for s in meta["shards"]] == [4, 3]
    with safe_open(tmp_path / "shard-00000.safetensors", "pt") as f:
        assert f.get_tensor("log_probs").dtype == torch.float16
        assert f.get_tensor("indices").dtype == torch.int32
        assert f.get_tensor("indices").shape == (4, 12, 5)
    assert meta["payload_bytes_per_token"] == 5 * 6
    assert 30 <= meta["bytes_per_token"] < 40  # payload + safetensors headers
    assert read_meta(tmp_path)["k"] == 5

    dataset = CachedTeacherDataset(blocks, tmp_path)
    with torch.no_grad():
        logits = teacher(input_ids=blocks[5:6]).logits[0]
    top = F.log_softmax(logits / 2.0, -1).topk(5, dim=-1)
    ids, log_probs, indices = dataset[5]  # second shard
    assert torch.equal(ids, blocks[5])
    assert torch.equal(indices.long(), top.indices)
    torch.testing.assert_close(log_probs.float(), top.values, atol=1e-2, rtol=1e-3)


def test_cache_refuses_other_data_and_other_temperature(tmp_path, teacher, blocks):
    write_cache(teacher, blocks, tmp_path, k=3)
    other = blocks.clone()
    other[0, 0] = (other[0, 0] + 1) % VOCAB
    with pytest.raises(ValueError, match="different token blocks"):
        CachedTeacherDataset(other, tmp_path)
    with pytest.raises(ValueError, match="holds 7 blocks"):
        CachedTeacherDataset(blocks[:5], tmp_path)
    with pytest.raises(ValueError, match="temperature"):
        CachedTrainData(TextDataModule(tokenizer=None), tmp_path, temperature=2.0)
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        read_meta(tmp_path / "missing")


def test_training_from_the_cache_needs_no_teacher(tmp_path, teacher, blocks):
    import lightning as L

    data = TextDataModule(tokenizer=None, batch_size=2)
    data.blocks = {"train": blocks, "validation": blocks[:2], "test": blocks[:2]}
    write_cache(teacher, blocks, tmp_path, k=8)
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=1))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = DistillModule(student, None, KDLoss(cache=str(tmp_path), top_k=8), lr=1e-2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=CachedTrainData(data, tmp_path, temperature=1.0))
    assert module.teacher is None and trainer.callback_metrics["train/kd"] > 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.slow
def test_cache_teacher_cli_then_train_from_it(tmp_path, tiny_teacher_dir):
    common = [
        f"teacher.name_or_path={tiny_teacher_dir}",
        f"output_root={tmp_path / 'outputs'}",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.max_train_blocks=8",
        "data.max_eval_blocks=2",
        "loss.top_k=16",
        "logger=csv",
    ]
    run = [sys.executable, "-m", "distill"]
    cache = subprocess.run(
        [*run, "cache-teacher", *common], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert cache.returncode == 0, cache.stderr[-3000:]
    assert "bytes/token" in cache.stdout
    (cache_dir,) = (tmp_path / "outputs" / "teacher-cache").iterdir()
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["k"] == 16 and meta["num_blocks"] == 8

    # train.py wiring: loss=topk_cached trains from that cache with no teacher in the module
    from distill.hydra_app import compose_recipe
    from distill.kd_setup import build_datamodule, build_module
    from distill.models.loading import load_causal_lm, load_tokenizer

    cfg = compose_recipe(overrides=[*common, "loss=topk_cached"])
    assert Path(cfg.loss.cache) == cache_dir
    teacher = load_causal_lm(str(tiny_teacher_dir))
    data = build_datamodule(cfg, load_tokenizer(str(tiny_teacher_dir)), tmp_path)
    module, datamodule = build_module(
        cfg, teacher, load_causal_lm(str(tiny_teacher_dir)), data, tmp_path
    )
    assert module.teacher is None and isinstance(datamodule, CachedTrainData)
    ids, log_probs, indices = next(iter(datamodule.train_dataloader()))
    assert log_probs.shape == (2, 32, 16) and indices.dtype == torch.int32
