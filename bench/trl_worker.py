"""TRL's side of bench/trl_side_by_side.py: GKDTrainer KD on fixed blocks, in the TRL venv.

Imports only torch, transformers, datasets and trl (run with /tmp/trl-venv/bin/python; the
parent's docstring has the setup). Reads the workdir the parent prepared (train_ordered.pt:
the training blocks in the order our seeded sampler serves them), trains the pruned student
against the teacher with forward KL (lmbda = 0: never on-policy; beta = 0: KL(teacher ‖ student);
temperature 1), fp32 on the CPU, no eval, no checkpoints, and writes trl/student (the trained
model) and trl/result.json (tokens/s over `trainer.train()`, peak RSS, per-step seconds, loss
and learning rate, library versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer


def rss_mb() -> float:
    """Peak resident set of this exec'd process, MiB (VmHWM; see rss_mb in the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """The schedule of distill.module.warmup_cosine, restated (this venv cannot import it)."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Fixed-length blocks: no padding, every next-token position is scored."""
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class StepRecorder(TrainerCallback):
    """Each optimizer step's seconds and learning rate, and the per-step loss TRL logs."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.optimizer = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({"lr": optimizer.param_groups[0]["lr"]})
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1]["seconds"] = time.perf_counter() - self._start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.steps:
            self.steps[-1]["loss"] = float(logs["loss"])


class CountingGKDTrainer(GKDTrainer):
    """GKDTrainer that records the normaliser its loss was divided by (num_items_in_batch)."""

    seen_num_items: list[int] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_num_items.append(
            int(num_items_in_batch) if num_items_in_batch is not None else -1
        )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument("--min-lr-ratio", type=float, required=True)
    parser.add_argument("--betas", required=True, help="b1,b2")
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--max-grad-norm", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    out = args.workdir / "trl"
    out.mkdir(parents=True, exist_ok=True)

    blocks = torch.load(args.workdir / "train_ordered.pt")
    if len(blocks) != args.steps * args.batch_size:
        raise SystemExit(f"{len(blocks)} blocks for {args.steps} × {args.batch_size}")
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    b1, b2 = (float(b) for b in args.betas.split(","))
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=args.lr,
        betas=(b1, b2),
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.warmup_steps, args.steps, args.min_lr_ratio)
    )
    config = GKDConfig(
        output_dir=str(out / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,  # the optimizer above carries it; recorded here for the log
        max_grad_norm=args.max_grad_norm,
        lmbda=0.0,  # never on-policy: always the given blocks
        beta=0.0,  # generalized JSD at beta 0 = F.kl_div(log p_s, log p_t) = KL(teacher ‖ student)
        temperature=1.0,
        seq_kd=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # SFTConfig defaults to True; ours does not checkpoint
        train_sampling_strategy="sequential",  # the parent already put the blocks in our order
        shuffle_dataset=False,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    recorder = StepRecorder()
    trainer = CountingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
        callbacks=[recorder],
    )
    rss_loaded = rss_mb()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = rss_mb()
    trainer.save_model(str(out / "student"))
    tokens = args.steps * args.batch_size * blocks.shape[1]
    scored = args.batch_size * (blocks.shape[1] - 1)
    num_items = CountingGKDTrainer.seen_num_items
    result = {
        "train_seconds": seconds,
        "train_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak,
        "peak_rss_mb_models_loaded": rss_loaded,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": recorder.steps,
        "num_items_in_batch": sorted(set(num_items)),
        # loss = Σ KL / num_items_in_batch; ours divides by the scored positions
        "loss_scale": scored / num_items[0] if num_items and num_items[0] > 0 else 1.0,
        "load_average_start_end": [load_start, os.getloadavg()],
        "threads": torch.get_num_threads(),
        "trainer": "trl.experimental.gkd.GKDTrainer",
        "config": {
            "lmbda": config.lmbda,
            "beta": config.beta,
            "temperature": config.temperature,
            "seq_kd": config.seq_kd,
            "bf16": config.bf16,
            "gradient_checkpointing": config.gradient_checkpointing,
            "max_grad_norm": config.max_grad_norm,
            "train_sampling_strategy": config.train_sampling_strategy,
            "optimizer": f"torch.optim.AdamW(betas=({b1}, {b2}), weight_decay={args.weight_decay})",
            "scheduler": f"LambdaLR warmup {args.warmup_steps} + cosine to {args.min_lr_ratio}",
        },
        "versions": {
            name: version(name)
            for name in ("trl", "transformers", "torch", "accelerate", "datasets")
        }
        | {"python": platform.python_version()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
