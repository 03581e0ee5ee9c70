"""Our KD trainer against TRL's, side by side (issue 14, item 2; a benchmark, not a test).

One pruned student, one teacher, the same training blocks in the same order, the same
objective (forward KL(teacher ‖ student) at T = 1 on every next-token position, no CE), the same
batch, steps, learning rate, warmup + cosine schedule, AdamW moments and gradient clipping, fp32
on the CPU. Each trainer runs in its own child process, so its peak RSS (VmHWM; the child's
`ru_maxrss` would start at the parent's peak, see `rss_mb`) is its own; both save the trained
student, and this parent scores the two on the same held-out blocks (perplexity, top-1
agreement with the teacher's argmax; `evaluate` from bench/distill_methods.py).

  ours: distill.module.DistillModule under Lightning, through `train()` of
        bench/distill_methods.py (loss=fkl: forward_kl, T = 1, kd_weight 1, ce_weight 0;
        precision 32-true).
  TRL:  trl.experimental.gkd.GKDTrainer (bench/trl_worker.py, run by the TRL venv's python)
        with lmbda = 0 (never on-policy), seq_kd = False, beta = 0. In TRL 1.16
        `GKDTrainer.generalized_jsd_loss` takes beta == 0 to
        `F.kl_div(student_log_probs, teacher_log_probs, log_target=True)`
        = Σ p_t (log p_t − log p_s) = KL(teacher ‖ student), i.e. forward KL. TRL 1.16's
        `DistillationTrainer` (promoted to `trl.DistillationTrainer`) is the newer, chunked
        trainer, but it is fully on-policy: it takes prompt-only data and trains on the student's
        own generations, with no lmbda to switch that off, so it cannot train on fixed text
        blocks; GKDTrainer with lmbda = 0 is TRL's supervised (teacher-forced) KD path.

TRL is installed in its own venv, never in the project's dependencies (torch first, pinned, so
pip cannot swap it; trl 1.16 itself does not depend on torch):

  python3.11 -m venv /tmp/trl-venv
  /tmp/trl-venv/bin/pip install torch==2.14.1
  echo 'torch==2.14.1' > /tmp/trl-constraints.txt
  /tmp/trl-venv/bin/pip install trl==1.16.0 -c /tmp/trl-constraints.txt

Run under the heavy lock (7.3 minutes measured on a quiet 2-core CPU with the defaults: 32 steps
× 8 × 128 tokens; results in docs/results.md):

  flock /tmp/nanodistill-heavy.lock python bench/trl_side_by_side.py

What still differs between the two setups is recorded in the JSON under "differences" and in
docs/results.md ("Against TRL, side by side").
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "trl_side_by_side.json"
TRL_PYTHON = "/tmp/trl-venv/bin/python"
log = logging.getLogger("bench.trl_side_by_side")

DIFFERENCES = [
    "Loss code: ours forms the student's logits chunk by chunk from the final hidden states "
    "(chunk_size 1024 rows, recomputed in backward); TRL's GKDTrainer takes the full "
    "(batch, seq, vocab) logits of both models from their forward and runs F.kl_div on them.",
    "Loss normaliser: ours divides the summed KL by the scored positions, batch × (seq_len − 1); "
    "TRL divides by the num_items_in_batch its Trainer counts over labels[..., 1:], the same "
    "number (trl.num_items_in_batch in the JSON; trl.loss_scale = ours / TRL's normaliser).",
    "Schedule: both use the same LambdaLR (linear warmup (step + 1) / warmup, cosine to "
    "min_lr_ratio); TRL is handed it with the optimizer through `optimizers=`. TRL's own "
    "'cosine_with_min_lr' would take its first step at lr 0 (warmup step / warmup).",
    "Optimizer: torch.optim.AdamW with the recipe's betas and weight decay on both sides "
    "(given to TRL; its default would be its own AdamW choice and betas (0.9, 0.999)).",
    "Order: TRL reads the blocks in exactly the order our seeded sampler serves them (the "
    "parent permutes them once; the TRL worker uses a SequentialSampler).",
    "Frameworks: Lightning 32-true vs transformers Trainer + accelerate on CPU (fp32, "
    "bf16/fp16 off, gradient_checkpointing off: SFTConfig's default would be on). Both time "
    "the whole fit/train call, setup included; the median step excludes it.",
    "Models: ours loads both with distill.models.loading.load_causal_lm (transformers of the "
    "project's env); TRL loads them with AutoModelForCausalLM of the TRL venv's transformers.",
]


def rss_mb() -> float:
    """This process's peak resident set so far, MiB: VmHWM of /proc/self/status.

    Not `getrusage(RUSAGE_SELF).ru_maxrss` alone: Linux carries the parent's high-water mark
    across fork + exec into it (the child's ru_maxrss starts at the parent's peak, here the
    teacher-holding parent's), while VmHWM belongs to the exec'd image only. Both are recorded.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overrides(args, workdir: Path) -> list[str]:
    return [
        f"student={args.student}",
        "loss=fkl",
        "loss.temperature=1.0",
        "loss.kd_weight=1.0",
        "loss.ce_weight=0.0",
        "trainer.precision=32-true",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        f"data.max_train_blocks={args.steps * args.batch_size}",
        f"data.max_eval_blocks={args.eval_blocks}",
        f"optim.lr={args.lr}",
        f"optim.warmup_steps={args.warmup_steps}",
        f"output_root={workdir}",
        f"+student.importance_path={workdir / 'importance.pt'}",
        *args.overrides,
    ]


# ----------------------------------------------------------------------------- our child


def run_ours(args) -> None:
    """Child: train the pruned student with DistillModule + Lightning; write ours/result.json."""
    workdir = Path(args.workdir)
    setup = json.loads((workdir / "setup.json").read_text())
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    import distill_methods  # bench/distill_methods.py: train() is the loop measured here
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from distill.hydra_app import compose_recipe
    from distill.models.loading import load_causal_lm
    from distill.module import DistillModule

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    steps: list[dict] = []

    class Recorded(DistillModule):
        """DistillModule that also keeps each step's seconds, loss and learning rate."""

        def on_train_batch_start(self, batch, batch_idx: int) -> None:
            super().on_train_batch_start(batch, batch_idx)
            steps.append({"lr": self.optimizers().param_groups[0]["lr"]})

        def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
            steps[-1]["seconds"] = time.perf_counter() - self._step_start
            steps[-1]["loss"] = float(outputs["loss"])
            super().on_train_batch_end(outputs, batch, batch_idx)

    distill_methods.DistillModule = Recorded  # train() builds the module by this name
    cfg = compose_recipe(overrides=setup["overrides"])
    L.seed_everything(cfg.seed)
    teacher = load_causal_lm(setup["teacher"]).eval().requires_grad_(False)
    student = load_causal_lm(setup["student_init"])
    data = instantiate(cfg.data, tokenizer=None, seed=cfg.seed)
    data.blocks = {"train": torch.load(workdir / "train.pt")}  # setup() keeps given blocks
    rss_loaded = rss_mb()
    seconds = distill_methods.train(cfg, student, teacher, data, setup["steps"], workdir / "ours")
    peak = rss_mb()
    student.save_pretrained(workdir / "ours" / "student")
    tokens = setup["steps"] * setup["batch_size"] * setup["seq_len"]
    result = {
        "train_seconds": seconds,
        "train_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak,
        "peak_rss_mb_models_loaded": rss_loaded,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
        "load_average_start_end": [load_start, os.getloadavg()],
        "threads": torch.get_num_threads(),
        "precision": "32-true",
        "gradient_clip_val": cfg.trainer.gradient_clip_val,
        "optim": OmegaConf.to_container(cfg.optim),
    }
    (workdir / "ours" / "result.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- parent


def child(cmd: list[str], name: str) -> float:
    log.info("%s: %s", name, " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=BENCH.parent)
    return time.perf_counter() - start


def median_step_tokens_per_s(steps: list[dict], tokens_per_step: int) -> float:
    """Median over steps 2.. (the first carries one-off allocation and warm-up)."""
    times = sorted(s["seconds"] for s in steps[1:]) or [s["seconds"] for s in steps]
    return tokens_per_step / times[len(times) // 2]


def per_block(evaluate, model, test: torch.Tensor, teacher_top1: torch.Tensor) -> list[dict]:
    return [evaluate(model, test[i : i + 1], teacher_top1[i : i + 1]) for i in range(len(test))]


def paired_ppl_ratio(a: list[dict], b: list[dict], samples: int = 2000) -> list[float]:
    """95% bootstrap interval (over held-out blocks, paired) of perplexity(a) / perplexity(b)."""
    nll_a = [math.log(r["perplexity"]) for r in a]  # every block scores the same count
    nll_b = [math.log(r["perplexity"]) for r in b]
    rng, n, ratios = random.Random(0), len(a), []
    for _ in range(samples):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(math.exp(sum(nll_a[i] - nll_b[i] for i in pick) / n))
    ratios.sort()
    return [ratios[int(0.025 * samples)], ratios[int(0.975 * samples)]]


class LoadSampler(threading.Thread):
    """1-minute load average every `every` seconds while the benchmark runs (ours alone ≈ 2)."""

    def __init__(self, every: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append([round(time.perf_counter() - start), os.getloadavg()[0]])
            self.stop.wait(self.every)


def parent(args) -> None:
    from distill_methods import evaluate, load_teacher_and_data, teacher_argmax
    from provenance import provenance
    from rich.console import Console
    from rich.table import Table

    from distill.data.resumable import SeededShuffleSampler
    from distill.hydra_app import compose_recipe
    from distill.models.loading import (
        count_parameters,
        load_causal_lm,
        resolve_model_path,
    )
    from distill.prune.stage import prune_stage

    if not Path(args.trl_python).exists():
        sys.exit(
            f"{args.trl_python} not found: set up the TRL venv first (see this file's docstring)"
        )
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    wall_start = time.perf_counter()
    sampler = LoadSampler()
    sampler.start()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = overrides(args, workdir)
    cfg = compose_recipe(overrides=base)
    tokenizer, teacher, data = load_teacher_and_data(cfg)
    teacher_dir = resolve_model_path(cfg.teacher.name_or_path)[0]
    train_blocks, test = data.blocks["train"], data.blocks["test"]
    if len(train_blocks) != args.steps * args.batch_size:
        raise SystemExit(f"only {len(train_blocks)} train blocks for {args.steps} steps")

    t = time.perf_counter()
    prune_stage(cfg.student, teacher, tokenizer, data, workdir / "prune")
    prune_seconds = time.perf_counter() - t
    student_init = workdir / "prune" / "student-init"
    order = list(SeededShuffleSampler(len(train_blocks), cfg.seed))  # what our loader serves
    torch.save(train_blocks, workdir / "train.pt")
    torch.save(train_blocks[order], workdir / "train_ordered.pt")
    torch.save(test, workdir / "test.pt")
    setup = {
        "overrides": base,
        "teacher": teacher_dir,
        "student_init": str(student_init),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
    }
    (workdir / "setup.json").write_text(json.dumps(setup, indent=2))

    teacher_top1 = teacher_argmax(teacher, test)
    rows = {
        "teacher": {**evaluate(teacher, test, teacher_top1), "params": count_parameters(teacher)}
    }
    teacher_params = rows["teacher"]["params"]
    del teacher, data
    gc.collect()
    init = load_causal_lm(str(student_init))
    rows["pruned init (no training)"] = {
        **evaluate(init, test, teacher_top1),
        "params": count_parameters(init),
    }
    del init
    log.info("teacher / init: %s", rows)

    sides = {}
    opt = cfg.optim
    common = [
        f"--workdir={workdir}",
        f"--threads={args.threads}",
    ]
    sides["ours"] = child(
        [sys.executable, str(Path(__file__).resolve()), "--child=ours", *common], "ours"
    )
    sides["trl"] = child(
        [
            args.trl_python,
            str(BENCH / "trl_worker.py"),
            *common,
            f"--teacher={teacher_dir}",
            f"--student={student_init}",
            f"--steps={args.steps}",
            f"--batch-size={args.batch_size}",
            f"--lr={opt.lr}",
            f"--warmup-steps={opt.warmup_steps}",
            f"--min-lr-ratio={opt.min_lr_ratio}",
            f"--betas={opt.betas[0]},{opt.betas[1]}",
            f"--weight-decay={opt.weight_decay}",
            f"--max-grad-norm={cfg.trainer.gradient_clip_val}",
            f"--seed={cfg.seed}",
        ],
        "trl",
    )

    results, blocks = {}, {}
    tokens_per_step = args.batch_size * args.seq_len
    for side, label in (("ours", "ours (DistillModule + Lightning)"), ("trl", "TRL GKDTrainer")):
        result = json.loads((workdir / side / "result.json").read_text())
        result["child_wall_seconds"] = sides[side]
        result["median_step_tokens_per_s"] = median_step_tokens_per_s(
            result["steps"], tokens_per_step
        )
        student = load_causal_lm(str(workdir / side / "student"))
        rows[label] = {**evaluate(student, test, teacher_top1), "params": count_parameters(student)}
        blocks[side] = per_block(evaluate, student, test, teacher_top1)
        results[side] = result
        del student
    ours, trl = results["ours"], results["trl"]
    labels = list(rows)[-2:]
    ppl_ratio = rows[labels[0]]["perplexity"] / rows[labels[1]]["perplexity"]
    ppl_ratio_ci = paired_ppl_ratio(blocks["ours"], blocks["trl"])
    targets = {
        # met when ours is lower, or the paired interval reaches 1, or the two agree to 0.1%
        "perplexity_ours_le_trl_within_noise": ppl_ratio <= 1.001 or ppl_ratio_ci[0] <= 1.0,
        "tokens_per_s_ours_ge_trl": ours["tokens_per_s"] >= trl["tokens_per_s"],
        "peak_rss_ours_le_trl": ours["peak_rss_mb"] <= trl["peak_rss_mb"],
    }
    summary = {
        "student": args.student,
        "teacher_params": teacher_params,
        "student_params": rows[labels[0]]["params"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "train_tokens": args.steps * tokens_per_step,
        "test_blocks": len(test),
        "test_tokens": int(test[:, 1:].numel()),
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "prune_seconds": prune_seconds,
        "overrides": base,
        "eval": rows,
        "ours": ours,
        "trl": trl,
        "ppl_ratio_ours_over_trl": ppl_ratio,
        "ppl_ratio_95ci_paired_bootstrap": ppl_ratio_ci,
        "first_step_loss": {"ours": ours["steps"][0]["loss"], "trl": trl["steps"][0]["loss"]},
        "targets": targets,
        "differences": DIFFERENCES,
        "trl_env": trl["versions"],
        "load_average_before_after": [load_before, os.getloadavg()],
        "load_samples_s_load1": sampler.samples,
        "wall_seconds": time.perf_counter() - wall_start,
        "workdir": str(workdir),
        "provenance": provenance(libraries=("lightning",)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))

    table = Table(
        title=f"Ours vs TRL {trl['versions'].get('trl')}: {args.student} student "
        f"({summary['student_params'] / 1e6:.1f}M of {teacher_params / 1e6:.1f}M), "
        f"{summary['train_tokens']:,} KD tokens ({args.steps} × {args.batch_size} × "
        f"{args.seq_len}), {summary['test_tokens']:,} held-out tokens"
    )
    for column in ("model", "held-out ppl", "top-1 agree", "train tok/s (fit)",
                   "median step tok/s", "peak RSS MiB"):  # fmt: skip
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, r in rows.items():
        side = {labels[0]: ours, labels[1]: trl}.get(name)
        table.add_row(
            name,
            f"{r['perplexity']:.2f}",
            f"{100 * r['agreement']:.1f}%",
            f"{side['tokens_per_s']:.1f}" if side else "",
            f"{side['median_step_tokens_per_s']:.1f}" if side else "",
            f"{side['peak_rss_mb']:,.0f}" if side else "",
        )
    console = Console(width=150)
    console.print(table)
    console.print(
        f"ppl ours/TRL {ppl_ratio:.5f} (95% paired bootstrap {ppl_ratio_ci[0]:.5f}–"
        f"{ppl_ratio_ci[1]:.5f}); first-step loss ours {ours['steps'][0]['loss']:.4f}, "
        f"TRL {trl['steps'][0]['loss']:.4f}; targets {targets}; load "
        f"{load_before[0]:.2f} → {os.getloadavg()[0]:.2f}"
    )
    print(f"saved {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="minitron-half", help="configs/student option")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-python", default=TRL_PYTHON)
    parser.add_argument("--workdir", default=None, help="default: a new temp dir")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. student.x=y")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(BENCH))  # provenance, distill_methods
    if args.child == "ours":
        run_ours(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
