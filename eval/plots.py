"""The report's matplotlib figures: retention bars, latency bars, training curves."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only rendered to PNG bytes
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from eval.retention import RETENTION  # noqa: E402


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def retention_figure(
    retention_by_model: dict[str, dict[str, float | None]], intervals: dict | None = None
) -> Figure:
    """Horizontal bars per metric (one colour per student), with the teacher's 1.0 marked and,
    when `intervals` (model → metric → {low, high}) are given, 95% whiskers."""
    metrics = [m for m in RETENTION if any(m in r for r in retention_by_model.values())]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(metrics) * max(len(retention_by_model), 1) + 1))
    height = 0.8 / max(len(retention_by_model), 1)
    for k, (name, ratios) in enumerate(retention_by_model.items()):
        values = [ratios.get(m) or 0.0 for m in metrics]
        ys = [i + k * height for i in range(len(metrics))]
        spans = [(intervals or {}).get(name, {}).get(m) or {} for m in metrics]
        xerr = None
        if any(span.get("low") is not None for span in spans):
            xerr = [
                [
                    max(v - (span.get("low") if span.get("low") is not None else v), 0)
                    for v, span in zip(values, spans, strict=True)
                ],
                [
                    max((span.get("high") if span.get("high") is not None else v) - v, 0)
                    for v, span in zip(values, spans, strict=True)
                ],
            ]
        ax.barh(ys, values, height=height, label=name, xerr=xerr, capsize=2)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(metrics))], metrics)
    ax.invert_yaxis()
    ax.set_xlabel("retention (1.0 = as good as the teacher)")
    # outside the axes: a legend inside would cover the bars
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("retention")
    return fig


def latency_figure(speed: dict[str, dict[str, float]]) -> Figure:
    """Time to first token and time per output token, one bar per model."""
    names = list(speed)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in (
        (axes[0], "ttft_ms", "time to first token (ms)"),
        (axes[1], "tpot_ms", "time per output token (ms)"),
    ):
        ax.bar(
            names,
            [speed[n][key] for n in names],
            color=["gray", "tab:blue", "tab:green"][: len(names)],
        )
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger metrics: column -> [(step, value)] for every numeric, non-empty cell."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    series.setdefault(key, []).append((float(step), float(value)))
                except ValueError:
                    continue
    return series


def training_figure(series: dict[str, list[tuple[float, float]]]) -> Figure | None:
    """One panel per training curve (train/loss, train/kd, …: on one axis a curve that equals
    another hides it) plus validation perplexity, each against the step."""
    keys = sorted(k for k, v in series.items() if v and ("loss" in k or "kd" in k))
    keys += [k for k in ("val/perplexity",) if series.get(k)]
    if not keys:
        return None
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        if all(v > 0 for v in values) and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
