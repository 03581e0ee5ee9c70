"""Does pruned-init + KD beat the obvious alternatives? (issue 3 benchmark; not a test)

Real teacher (SmolLM2-135M-Instruct), wiki splits, one student shape (`student=minitron-half`,
about half the teacher's parameters), one token budget for every trained variant:

  (a) pruned init + KD      with fkl / rkl / jsd / top-k cached (offline teacher)
  (b) random init + KD      (fkl; same shape, fresh weights)
  (c) pruned, no training
  (d) pruned + plain CE     (no teacher)

Held-out metrics on the test split: perplexity and top-1 agreement with the teacher's argmax.
Run under the heavy lock (~30 min on a 2-core CPU with the defaults):

  flock /tmp/nanodistill-heavy.lock python bench/distill_methods.py
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from provenance import provenance  # bench/provenance.py (the script's own directory)
from rich.console import Console
from rich.table import Table

from distill.data.teacher_cache import CachedTrainData, write_cache
from distill.hydra_app import compose_recipe
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.module import DistillModule
from distill.prune.stage import prune_stage

log = logging.getLogger("bench.distill_methods")
RESULTS = Path(__file__).parent / "results" / "distill_methods.json"

# name → (init, loss option or None for no training)
VARIANTS = {
    "(a) pruned + KD fkl": ("prune", "fkl"),
    "(a) pruned + KD rkl": ("prune", "rkl"),
    "(a) pruned + KD jsd": ("prune", "jsd"),
    "(a) pruned + KD top-k cached": ("prune", "topk_cached"),
    "(b) random + KD fkl": ("random", "fkl"),
    "(c) pruned, no training": ("prune", None),
    "(d) pruned + CE (no teacher)": ("prune", "ce"),
}


def compose_cfg(overrides: list[str]):
    return compose_recipe(overrides=overrides)


def load_teacher_and_data(cfg):
    """(tokenizer, frozen teacher, set-up datamodule) of a composed recipe, seeded first."""
    L.seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    teacher = load_causal_lm(cfg.teacher.name_or_path).eval().requires_grad_(False)
    data = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    data.setup()
    return tokenizer, teacher, data


@torch.no_grad()
def teacher_argmax(teacher, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The teacher's top-1 token at positions 0..S-2 of each block: what `evaluate` compares."""
    return torch.cat(
        [
            teacher(input_ids=blocks[i : i + batch_size], use_cache=False).logits[:, :-1].argmax(-1)
            for i in range(0, len(blocks), batch_size)
        ]
    )


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, teacher_top1: torch.Tensor | None, batch_size=8):
    """Held-out perplexity and top-1 agreement with the teacher's argmax (positions 0..S-2)."""
    model.eval()
    nll, agree, count = 0.0, 0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        ).item()
        if teacher_top1 is not None:
            agree += (logits.argmax(-1) == teacher_top1[i : i + batch_size]).sum().item()
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "agreement": agree / count if count else 0.0}


def train(
    cfg, student, teacher, data, steps: int, workdir: Path, precision: str = "32-true"
) -> float:
    """Lightning fit for `steps` steps; returns wall seconds."""
    loss = instantiate(cfg.loss)
    datamodule = data
    if loss.cache:
        datamodule, teacher = CachedTrainData(data, loss.cache, loss.temperature), None
    if loss.kd_weight == 0:
        teacher = None  # CE baseline: the teacher is not even run
    if cfg.student.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    module = DistillModule(student, teacher, loss=loss, seed=cfg.seed, **cfg.optim)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        default_root_dir=str(workdir),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    student.requires_grad_(True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="minitron-half", help="configs/student option")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. student.x=y")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)

    workdir = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    base = [
        f"student={args.student}",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        f"data.max_train_blocks={args.steps * args.batch_size}",
        f"data.max_eval_blocks={args.eval_blocks}",
        f"optim.lr={args.lr}",
        f"loss.top_k={args.top_k}",
        f"output_root={workdir}",
        f"+student.importance_path={workdir / 'importance.pt'}",  # one calibration pass
        *args.overrides,
    ]
    cfg = compose_cfg(base)
    tokenizer, teacher, data = load_teacher_and_data(cfg)
    test = data.blocks["test"]
    tokens_budget = args.steps * args.batch_size * args.seq_len

    teacher_top1 = teacher_argmax(teacher, test)
    rows = {
        "teacher": {**evaluate(teacher, test, teacher_top1), "params": count_parameters(teacher)}
    }
    log.info("teacher: %s", rows["teacher"])

    prune_dir = workdir / "prune"
    inits = {}
    for init in sorted({VARIANTS[v][0] for v in args.variants}):
        student_cfg = compose_cfg([*base, f"student.init={init}"]).student
        t = time.perf_counter()
        L.seed_everything(cfg.seed)
        prune_stage(student_cfg, teacher, tokenizer, data, prune_dir / init)
        inits[init] = time.perf_counter() - t

    cache_meta = None
    for name in args.variants:
        init, loss_name = VARIANTS[name]
        vcfg = compose_cfg([*base, f"student.init={init}", f"loss={loss_name or 'fkl'}"])
        L.seed_everything(cfg.seed)
        student = load_causal_lm(str(prune_dir / init / "student-init"))
        extra = {}
        if loss_name == "topk_cached" and cache_meta is None:
            t = time.perf_counter()
            cache_meta = write_cache(
                teacher, data.blocks["train"], vcfg.loss.cache, k=args.top_k, vocab=len(tokenizer)
            )
            extra["cache_seconds"] = time.perf_counter() - t
        if loss_name == "topk_cached":
            extra["cache_bytes_per_token"] = cache_meta["bytes_per_token"]
        seconds = train(vcfg, student, teacher, data, args.steps, workdir) if loss_name else 0.0
        rows[name] = {
            **evaluate(student, test, teacher_top1),
            "params": count_parameters(student),
            "train_tokens": tokens_budget if loss_name else 0,
            "train_seconds": seconds,
            **extra,
        }
        log.info("%s: %s", name, rows[name])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = {"partial": True, "overrides": base, "results": rows, "provenance": provenance()}
        args.out.write_text(json.dumps(partial, indent=2))  # so far

    summary = {
        "student": args.student,
        "student_params": rows[args.variants[0]]["params"],
        "teacher_params": rows["teacher"]["params"],
        "token_budget": tokens_budget,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "top_k": args.top_k,
        "test_tokens": int(test[:, 1:].numel()),
        "overrides": base,  # every variant composes these plus student.init= and loss=
        "results": rows,
        "provenance": provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))

    table = Table(
        title=f"Distillation methods: {args.student} student "
        f"({summary['student_params'] / 1e6:.1f}M of {summary['teacher_params'] / 1e6:.1f}M), "
        f"{tokens_budget:,} training tokens each, {summary['test_tokens']:,} held-out tokens"
    )
    for column in ("variant", "held-out ppl", "top-1 agree", "train s", "notes"):
        table.add_column(column)
    for name, r in rows.items():
        note = (
            f"cache {r['cache_bytes_per_token']:.0f} B/token"
            if "cache_bytes_per_token" in r
            else ""
        )
        table.add_row(
            name,
            f"{r['perplexity']:.2f}",
            f"{100 * r['agreement']:.1f}%",
            f"{r.get('train_seconds', 0):.0f}",
            note,
        )
    Console(width=140).print(table)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
