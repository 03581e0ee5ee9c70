"""GPU checks of the scale-out options on tiny models (needs CUDA; not a test).

  python bench/scaleout_gpu_check.py [out.json]   # default bench/results/scaleout_gpu_check.json

trainer=fsdp (teacher sharded in configure_model), trainer=ddp, teacher.load_in_8bit=true
(bitsandbytes), optim.optimizer=adamw8bit, trainer=deepspeed when deepspeed is installed. Each
check runs in its own process (one strategy per process group) and prints PASS / FAIL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from provenance import provenance  # bench/provenance.py (the script's own directory)

CHECKS = ("fsdp", "ddp", "teacher_8bit", "adamw8bit", "deepspeed")
RESULTS = Path(__file__).resolve().parent / "results" / "scaleout_gpu_check.json"


def run_check(name: str, workdir: Path) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import LlamaForCausalLM

    from distill.data.text import TextDataModule
    from distill.losses import KDLoss
    from distill.models.loading import load_causal_lm
    from distill.models.tiny import save_tiny_llama, tiny_llama_config
    from distill.module import DistillModule
    from distill.paths import configs_dir, recipes_dir
    from distill.precision import lightning_precision
    from distill.rundir import register_resolvers

    trainer_option = {"fsdp": "fsdp", "ddp": "ddp", "deepspeed": "deepspeed"}.get(name, "gpu")
    register_resolvers()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose(
            "nano-text",
            overrides=[
                f"hydra.searchpath=[file://{configs_dir()}]",
                f"trainer={trainer_option}",
                "trainer.devices=1",
                "trainer.max_steps=3",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
            ],
        )
    vocab = 512
    teacher_dir = save_tiny_llama(workdir / "teacher", vocab_size=vocab, hidden_size=128)
    teacher = load_causal_lm(str(teacher_dir), device="cuda", load_in_8bit=(name == "teacher_8bit"))
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, num_hidden_layers=2))
    data = TextDataModule(tokenizer=None, seq_len=32, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    data.blocks = {
        s: torch.randint(0, vocab, (16, 32), generator=gen) for s in ("train", "validation", "test")
    }
    module = DistillModule(
        student,
        teacher,
        KDLoss(),
        lr=1e-2,
        optimizer="adamw8bit" if name == "adamw8bit" else "adamw",
    )
    precision = lightning_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    trainer = instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False, precision=precision
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    info = {
        "strategy": type(trainer.strategy).__name__,
        "teacher_type": type(module.teacher).__name__,
        "teacher_sharded": module._teacher_sharded,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "metrics": metrics,
    }
    ok = torch.isfinite(torch.tensor(metrics["train/loss"])).item() and metrics["train/kd"] > 0
    if name == "fsdp":
        ok = ok and module._teacher_sharded and info["teacher_type"] == "FullyShardedDataParallel"
    if name == "teacher_8bit":
        linear = type(teacher.model.layers[0].mlp.down_proj).__name__
        info["teacher_linear"] = linear
        ok = ok and linear == "Linear8bitLt"
    if name == "adamw8bit":
        ok = ok and info["optimizer"] == "AdamW8bit"
    return {"ok": bool(ok), **info}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    results = {}
    for name in CHECKS:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=240
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"ok": False}
        if not lines:
            result["error"] = proc.stderr[-2500:]
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        print(
            f"{'PASS' if result['ok'] else 'FAIL'} {name}: {json.dumps(result)[:1500]}", flush=True
        )
    summary = {
        "checks": results,
        "provenance": provenance(("lightning", "bitsandbytes", "deepspeed")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        name = sys.argv[2]
        try:
            if name == "deepspeed":
                import importlib.util

                if importlib.util.find_spec("deepspeed") is None:
                    print('RESULT {"ok": false, "skipped": "deepspeed not installed"}')
                    sys.exit(0)
            with tempfile.TemporaryDirectory() as tmp:
                print("RESULT " + json.dumps(run_check(name, Path(tmp))))
        except Exception as exc:  # report, not crash: the parent prints the traceback
            traceback.print_exc()
            print("RESULT " + json.dumps({"ok": False, "error": repr(exc)[:1000]}))
    else:
        main()
