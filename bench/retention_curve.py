"""Quality per compute: held-out perplexity and teacher agreement vs training tokens (issue 14).

One half-size student init (`student=minitron-half`, the default recipe's pick), trained from
scratch for each token budget (its own warmup-cosine schedule, so a cell is what a run of that
budget gets, not a checkpoint of a longer run) with each variant:

  fkl             forward KL, T=1 (the loss the default recipe used until this benchmark)
  fkl+ce          forward KL plus CE on the labels, equal weights (`loss=fkl_ce`)
  ce              CE only, the teacher never runs (the baseline KD must beat)
  topk-cached+ce  fkl+ce with the teacher's offline top-k cache (k=64) instead of the teacher
  fkl+ce 15x504   fkl+ce from the best untrained shape of bench/prune_shapes.py
                  (15 layers x 504 wide) instead of minitron-half's pick (27 x 432)

`--custom NAME=override,override` adds a variant (a learning-rate or temperature sweep). Every
cell is labelled with its learning rate ("fkl+ce lr=0.001"), so sweeps and curves share a file.
Held-out: the wiki test split, never trained on. Cells are merged into the JSON as they finish,
so a long grid can run in several sittings (the inits and the cache stay in --workdir):

  flock /tmp/nanodistill-heavy.lock python bench/retention_curve.py --budgets 20480 81920
  flock /tmp/nanodistill-heavy.lock python bench/retention_curve.py --budgets 327680 --variants fkl+ce ce
  python bench/retention_curve.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from distill_methods import (  # bench/ (the script's own directory)
    evaluate,
    load_teacher_and_data,
    teacher_argmax,
    train,
)
from provenance import provenance
from rich.console import Console
from rich.table import Table

from distill.data.teacher_cache import write_cache
from distill.hydra_app import compose_recipe
from distill.models.loading import count_parameters, load_causal_lm
from distill.prune.stage import prune_stage

log = logging.getLogger("bench.retention_curve")
RESULTS = Path(__file__).parent / "results" / "retention_curve.json"
PLOT = Path(__file__).parent / "results" / "retention_curve.png"

SHAPE_15x504 = [
    "student.num_hidden_layers=15",
    "student.hidden_size=504",
    "student.intermediate_size=1344",
]
# name → (init name, Hydra overrides). Every variant composes the shared base first.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "fkl": ("half", ["loss=fkl"]),
    "fkl+ce": ("half", ["loss=fkl_ce"]),
    "ce": ("half", ["loss=ce"]),
    "topk-cached+ce": ("half", ["loss=topk_cached", "loss.ce_weight=1.0"]),
    "fkl+ce 15x504": ("15x504", ["loss=fkl_ce"]),
}
INITS = {"half": [], "15x504": SHAPE_15x504}


def parse_custom(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """`NAME=ov1,ov2` → a variant on the half init; `init=15x504` among the overrides switches."""
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o]
        init = "half"
        for o in list(overrides):
            if o.startswith("init="):
                init = o.removeprefix("init=")
                overrides.remove(o)
        if not name or init not in INITS:
            raise SystemExit(
                f"--custom {spec!r}: expected NAME=override,... (init one of {list(INITS)})"
            )
        out[name] = (init, overrides)
    return out


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"cells": {}, "runs": []}


def label(cell: dict) -> str:
    """'fkl+ce lr=0.001': the variant name without any lr in it, then the cell's rate."""
    name = " ".join(w for w in cell["variant"].split() if not w.startswith("lr"))
    return f"{name} lr={cell['lr']:g}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_variant: dict[str, list[tuple[int, dict]]] = {}
    for cell in results["cells"].values():
        by_variant.setdefault(label(cell), []).append((cell["train_tokens"], cell))
    curves = {v: pts for v, pts in by_variant.items() if len(pts) > 1}
    sweep = [pt for v, pts in by_variant.items() if len(pts) == 1 for pt in pts]
    for variant, points in sorted(curves.items()):
        points.sort(key=lambda p: p[0])
        tokens = [p[0] for p in points]
        axes[0].plot(tokens, [p[1]["perplexity"] for p in points], marker="o", label=variant)
        axes[1].plot(tokens, [100 * p[1]["agreement"] for p in points], marker="o", label=variant)
    if sweep:  # single-budget cells: the learning-rate / temperature sweep
        style = {"marker": "x", "color": "grey", "ls": "none", "alpha": 0.7}
        tokens = [p[0] for p in sweep]
        label_ = "sweep cells (other lr / T)"
        axes[0].plot(tokens, [p[1]["perplexity"] for p in sweep], label=label_, **style)
        axes[1].plot(tokens, [100 * p[1]["agreement"] for p in sweep], **style)
    teacher = results.get("teacher")
    if teacher:
        axes[0].axhline(teacher["perplexity"], color="k", ls="--", lw=1, label="teacher")
    for ax, ylabel in zip(
        axes, ("held-out perplexity", "top-1 agreement with teacher (%)"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Half-size student of SmolLM2-135M: quality per training token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict) -> None:
    table = Table(title="Retention curve (held-out wiki test)")
    for column in ("variant", "tokens", "ppl", "ppl retention", "top-1 agree", "train s", "tok/s"):
        table.add_column(column)
    teacher_ppl = results.get("teacher", {}).get("perplexity")
    cells = sorted(results["cells"].values(), key=lambda c: (label(c), c["train_tokens"]))
    for c in cells:
        retention = f"{teacher_ppl / c['perplexity']:.3f}" if teacher_ppl else "-"
        rate = c["train_tokens"] / c["train_seconds"] if c["train_seconds"] else 0
        table.add_row(
            label(c),
            f"{c['train_tokens']:,}",
            f"{c['perplexity']:.2f}",
            retention,
            f"{100 * c['agreement']:.1f}%",
            f"{c['train_seconds']:.0f}",
            f"{rate:.0f}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=int, nargs="*", default=[20480, 81920, 327680])
    parser.add_argument("--variants", nargs="*", default=None, help="default: all built-in")
    parser.add_argument("--custom", nargs="*", default=[], help="NAME=override,override")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--max-budget", type=int, default=327680, help="sizes the train set")
    parser.add_argument("--lr", type=float, default=1e-3, help="best of 3e-4/1e-3/2e-3 at 20k")
    parser.add_argument("--precision", default="auto", help="32-true | bf16-mixed | auto")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/retention_curve"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    results = load_results(args.out)
    if args.plot_only:
        plot(results, args.plot)
        print_table(results)
        return

    from distill.precision import auto_precision

    precision = auto_precision("cpu") if args.precision == "auto" else args.precision
    variants = {**VARIANTS, **parse_custom(args.custom)}
    chosen = args.variants or [*VARIANTS, *parse_custom(args.custom)]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; built-in: {list(VARIANTS)}")
    torch.set_num_threads(2)
    workdir = args.workdir.resolve()
    base = [
        "student=minitron-half",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        f"data.max_train_blocks={args.max_budget // args.seq_len}",
        f"data.max_eval_blocks={args.eval_blocks}",
        f"optim.lr={args.lr}",
        f"output_root={workdir}",
        f"+student.importance_path={workdir / 'importance.pt'}",  # one calibration pass
    ]
    cache_dir = workdir / f"topk-cache-{args.max_budget}"  # only loss=topk_cached reads it
    cfg = compose_recipe(overrides=base)
    tokenizer, teacher, data = load_teacher_and_data(cfg)
    test = data.blocks["test"]
    teacher_top1 = teacher_argmax(teacher, test)
    results["teacher"] = {
        **evaluate(teacher, test, teacher_top1),
        "params": count_parameters(teacher),
    }
    results["setup"] = {
        "base_overrides": base,
        "precision": precision,
        "test_tokens": int(test[:, 1:].numel()),
        "train_blocks": len(data.blocks["train"]),
    }
    log.info("teacher: %s", results["teacher"])

    run_started = time.time()
    for name in chosen:
        init, overrides = variants[name]
        init_dir = workdir / "inits" / init
        if not (init_dir / "student-init").exists():
            L.seed_everything(cfg.seed)
            prune_stage(
                compose_recipe(overrides=[*base, *INITS[init]]).student,
                teacher,
                tokenizer,
                data,
                init_dir,
            )
        vcfg = compose_recipe(overrides=[*base, *INITS[init], *overrides])
        if vcfg.loss.cache:  # the option's placeholder path → this benchmark's one cache
            vcfg.loss.cache = str(cache_dir)
        if vcfg.loss.cache and not (Path(vcfg.loss.cache) / "meta.json").exists():
            t = time.perf_counter()
            write_cache(
                teacher,
                data.blocks["train"],
                vcfg.loss.cache,
                k=vcfg.loss.top_k,
                vocab=len(tokenizer),
            )
            results.setdefault("cache_seconds", time.perf_counter() - t)
        for budget in args.budgets:
            steps = budget // (args.batch_size * args.seq_len)
            L.seed_everything(cfg.seed)
            student = load_causal_lm(str(init_dir / "student-init"))
            seconds = train(vcfg, student, teacher, data, steps, workdir, precision=precision)
            cell = {
                "variant": name,
                "overrides": [*INITS[init], *overrides],
                "train_tokens": steps * args.batch_size * args.seq_len,
                "steps": steps,
                "lr": float(vcfg.optim.lr),
                "train_seconds": seconds,
                "precision": precision,
                "params": count_parameters(student),
                **evaluate(student, test, teacher_top1),
            }
            results["cells"][f"{label(cell)}@{cell['train_tokens']}"] = cell
            log.info(
                "%s @ %d tokens: ppl %.2f agree %.3f (%.0f s)",
                name,
                cell["train_tokens"],
                cell["perplexity"],
                cell["agreement"],
                seconds,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    results["runs"].append(
        {
            "variants": chosen,
            "budgets": args.budgets,
            "started": run_started,
            "seconds": time.time() - run_started,
            "provenance": provenance(),
        }
    )
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print_table(results)
    print(f"saved {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
