"""Where a KD step's time goes on this CPU, and what `trainer.precision=auto` buys.

    flock /tmp/nanodistill-heavy.lock python bench/kd_step.py

The default recipe's step (teacher SmolLM2-135M, a Minitron-half-shaped student of 27 layers ×
432 wide × 768 MLP, batch 8 × 256 tokens of the embedded Wikipedia corpus, forward KL through
the chunked head, AdamW) is timed part by part — teacher forward, student forward, loss,
backward, optimizer — in fp32 (today's CPU default, `32-true`) and under bf16 autocast
(`bf16-mixed`, what `auto` picks where the CPU has native bf16), from the same initial weights on
the same batches. The loss of each step is recorded for both, so a precision that trains
differently shows up beside its speed. Prints a table, writes JSON with provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

from distill.losses import HeadStates, KDLoss  # noqa: E402
from distill.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from distill.precision import auto_precision  # noqa: E402

STUDENT_SHAPE = {"num_hidden_layers": 27, "hidden_size": 432, "intermediate_size": 768,
                 "head_dim": 64}  # fmt: skip
PARTS = ("teacher_forward", "student_forward", "loss", "backward", "optimizer")


def batches(tokenizer, n: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    from distill.data.text import TextDataModule

    data = TextDataModule(tokenizer, seq_len=seq_len, batch_size=batch_size,
                          max_train_blocks=n * batch_size, max_eval_blocks=1)  # fmt: skip
    data.setup()
    return list(data.blocks["train"].split(batch_size))[:n]


def student_from(teacher) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(teacher.config)
    for key, value in STUDENT_SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def run(teacher, student, data: list[torch.Tensor], precision: str, warmup: int) -> dict:
    """Time each part of every step; the first `warmup` steps are excluded from the times."""
    student = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, betas=(0.9, 0.95))
    loss_fn = KDLoss(chunk_size=1024)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    times = {p: [] for p in PARTS}
    losses, step_s = [], []
    for i, ids in enumerate(data):
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        marks = [time.perf_counter()]
        with autocast:
            with torch.inference_mode():
                t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            t_hidden = t_hidden.clone()  # inference tensors cannot enter autograd's graph
            marks.append(time.perf_counter())
            s_hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
            marks.append(time.perf_counter())
            out = loss_fn(HeadStates(s_hidden, student.lm_head),
                          HeadStates(t_hidden, teacher.lm_head), labels)  # fmt: skip
            marks.append(time.perf_counter())
        out["loss"].backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        losses.append(out["loss"].item())
        if i >= warmup:
            for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True):
                times[part].append(b - a)
            step_s.append(marks[-1] - marks[0])
        print(f"  {precision} step {i + 1}/{len(data)}  loss {losses[-1]:.4f}  "
              f"{marks[-1] - marks[0]:.2f} s", flush=True)  # fmt: skip
    tokens = data[0].numel()
    median_step = statistics.median(step_s)
    return {
        "precision": precision,
        "median_step_s": median_step,
        "tokens_per_s": tokens / median_step,
        "parts_median_s": {p: statistics.median(v) for p, v in times.items()},
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/kd_step.json")
    args = ap.parse_args()
    from distill.assets import teacher_dir

    teacher = load_causal_lm(str(teacher_dir()), "float32", "cpu").eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(teacher_dir()))
    data = batches(tokenizer, args.steps, args.batch_size, args.seq_len)
    student = student_from(teacher)
    load_before = os.getloadavg()
    results = [run(teacher, student, data, p, args.warmup) for p in ("32-true", "bf16-mixed")]
    fp32, bf16 = results
    speedup = fp32["median_step_s"] / bf16["median_step_s"]
    loss_gap = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True))
    lines = ["| part | 32-true s | bf16-mixed s | ratio |", "|---|---|---|---|"]
    for part in (*PARTS, "step"):
        a = fp32["median_step_s"] if part == "step" else fp32["parts_median_s"][part]
        b = bf16["median_step_s"] if part == "step" else bf16["parts_median_s"][part]
        lines.append(f"| {part} | {a:.3f} | {b:.3f} | {a / b:.2f}× |")
    lines.append(f"| tokens/s | {fp32['tokens_per_s']:.0f} | {bf16['tokens_per_s']:.0f} | "
                 f"{speedup:.2f}× |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    print(f"auto picks {auto_precision('cpu')} here; largest per-step loss gap {loss_gap:.4f}")
    record = {
        "provenance": provenance(),
        "student_shape": STUDENT_SHAPE,
        "batch": [args.batch_size, args.seq_len],
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "auto_precision": auto_precision("cpu"),
        "results": results,
        "bf16_speedup": speedup,
        "max_loss_gap": loss_gap,
        "load_average_before_after": [load_before, os.getloadavg()],
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
