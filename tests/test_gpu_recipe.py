"""recipes/nano-text-gpu.yaml: its composition, and the same chain run on CPU with a tiny budget
(the teacher's top-k cache built in the run, KD from it, QAT, eval, export)."""

from __future__ import annotations

import json

from test_train import QUICK, run_train

from distill.hydra_app import compose_recipe


def test_gpu_recipe_composes_the_long_chain():
    cfg = compose_recipe("nano-text-gpu")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "auto"
    assert cfg.student.params == 0.5 and cfg.quant.method == "qat"
    assert cfg.build_teacher_cache is True and cfg.loss.cache.endswith("seq1024-k64-T1.0")
    tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len
    assert tokens >= 40_000_000  # a real token budget, not the CPU default's 82k


def test_gpu_recipe_runs_on_cpu_with_a_tiny_budget(tmp_path, tiny_teacher_dir):
    cache = tmp_path / "cache"
    result = run_train(
        tmp_path, tiny_teacher_dir, "recipe=nano-text-gpu", "trainer.accelerator=cpu",
        "trainer.max_steps=2", "trainer.limit_val_batches=1", "data.num_workers=0",
        "eval_batch_size=2", f"loss.cache={cache}", "loss.top_k=8",
    )  # fmt: skip
    assert len(QUICK) and "teacher cache:" in result.stdout  # the cache stage ran
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["k"] == 8 and meta["seq_len"] == 32
    (run_dir,) = (tmp_path / "outputs" / "nano-text-gpu").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["stage_seconds"]) == [
        "setup", "prune", "cache", "distill", "quant", "eval", "export", "total"
    ]  # fmt: skip
    serving = json.loads((run_dir / "export" / "serving.json").read_text())
    assert serving["quantization"] == "int8" and serving["model"].startswith("nano-text-gpu-")
    # a second run reuses the cache instead of rebuilding it
    (tmp_path / "again").mkdir()
    again = run_train(tmp_path / "again", tiny_teacher_dir, "recipe=nano-text-gpu",
                      "trainer.accelerator=cpu", "trainer.max_steps=2",
                      "trainer.limit_val_batches=1", "data.num_workers=0", "eval_batch_size=2",
                      f"loss.cache={cache}", "loss.top_k=8", "quant=none", "export=false")  # fmt: skip
    assert "teacher cache:" not in again.stdout
    assert json.loads((cache / "meta.json").read_text()) == meta
