"""The report's metrics, tables and images logged to a wandb run (offline by default)."""

from __future__ import annotations

from pathlib import Path


def log_report(run, report: dict, output_dir: Path) -> None:
    """Log eval/<section>/<model>/<metric> scalars, sample/VQA tables and the plot images."""
    import wandb

    scalars = {}
    for name, metrics in report["models"].items():
        scalars |= {f"eval/models/{name}/{k}": v for k, v in metrics.items() if v is not None}
    scalars |= {f"eval/retention/{k}": v for k, v in report["retention"].items() if v is not None}
    for name, metrics in report["speed"].items():
        scalars |= {f"eval/speed/{name}/{k}": v for k, v in metrics.items() if v is not None}
    names = list(report["models"])
    columns = ["prompt", "reference", *names]
    scalars["eval/samples"] = wandb.Table(
        columns=columns, data=[[s.get(c, "") for c in columns] for s in report["samples"]]
    )
    if report.get("vqa_examples"):
        columns = ["image", "question", "answer", *names]
        scalars["eval/vqa_examples"] = wandb.Table(
            columns=columns,
            data=[
                [wandb.Image(e["image"]), e["question"], e["answer"], *(e[n] for n in names)]
                for e in report["vqa_examples"]
            ],
        )
    for png in sorted(output_dir.glob("*.png")):
        scalars[f"eval/plots/{png.stem}"] = wandb.Image(str(png))
    run.log(scalars)
    run.summary.update({k: v for k, v in scalars.items() if isinstance(v, int | float)})
