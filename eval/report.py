"""Report files: report.json (stable keys), report.md and a self-contained report.html with
inline PNG plots, sample generations and VQA examples; optionally the same to a wandb run."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path

from eval.plots import (
    latency_figure,
    png_bytes,
    read_metrics_csv,
    retention_figure,
    training_figure,
)
from eval.retention import RETENTION

log = logging.getLogger(__name__)

SPEED_COLUMNS = ("ttft_ms", "tpot_ms", "tokens_per_s", "weights_mb", "peak_mem_mb")


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def with_interval(value, low=None, high=None) -> str:
    """'18.07 [17.2, 19.1]' (the 95% interval when there is one)."""
    if low is None or high is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _interval(report: dict, section: str, name: str, metric: str) -> tuple:
    rec = report.get(section, {}).get(name, {}).get(metric) or {}
    return rec.get("low"), rec.get("high"), rec.get("n"), rec.get("unit")


def students_of(report: dict) -> list[str]:
    return [n for n in report["models"] if n != "teacher"]


def headline_header(report: dict) -> list[str]:
    return [
        "model",
        "parameters",
        "weights MB",
        "tokens/s [95%]",
        "speed vs teacher",
        "perplexity [95%]",
        "perplexity retention [95%]",
        "top-1 agreement",
    ]


def headline_rows(report: dict) -> list[list[str]]:
    """The answer: size, bytes, speed and quality of every model, side by side."""
    rows = []
    for name, m in report["models"].items():
        speed = report["speed"].get(name, {})
        ppl_low, ppl_high, _, _ = _interval(report, "intervals", name, "perplexity")
        ret = report.get("retention_by_model", {}).get(name, {}).get("perplexity")
        ret_low, ret_high, _, _ = _interval(report, "retention_intervals", name, "perplexity")
        ratio = speed.get("tokens_per_s_vs_teacher")
        rows.append(
            [
                name,
                f"{m['parameters']:,}" if m.get("parameters") else "–",
                fmt(speed.get("weights_mb")),
                with_interval(
                    speed.get("tokens_per_s"),
                    speed.get("tokens_per_s_low"),
                    speed.get("tokens_per_s_high"),
                )
                + (" (noisy)" if speed.get("noisy") else ""),
                f"{ratio:.2f}×" if ratio else "1×",
                with_interval(m.get("perplexity"), ppl_low, ppl_high),
                "1" if name == "teacher" else with_interval(ret, ret_low, ret_high),
                fmt(m.get("top1_agreement")),
            ]
        )
    return rows


def sample_sizes(report: dict) -> str:
    """'perplexity on 4,080 tokens (16 × 256-token blocks), probe 16 paragraphs, …'."""
    teacher = report.get("intervals", {}).get("teacher", {})
    parts = []
    for metric, label in (
        ("perplexity", "perplexity / agreement"),
        ("coherence_probe", "coherence probe"),
        ("generation_teacher_ppl", "generation"),
        ("vqa_accuracy", "VQA"),
    ):
        if metric in teacher:
            parts.append(f"{label}: {teacher[metric]['n']} {teacher[metric]['unit']}")
    tokens = report["models"].get("teacher", {}).get("tokens")
    seq_len = report.get("config", {}).get("eval", {}).get("seq_len")
    if tokens and parts:
        parts[0] += f" of {seq_len} tokens ({tokens:,} scored tokens)"
    return "; ".join(parts)


def metric_header(report: dict) -> list[str]:
    students = students_of(report)
    return ["metric", "n", *report["models"], *(f"retention ({s})" for s in students)]


def metric_rows(report: dict) -> list[list[str]]:
    """[metric, n, <value [95%] per model>, <retention [95%] per student>] in RETENTION order."""
    models = report["models"]
    rows = []
    for metric in RETENTION:
        if metric not in models.get("teacher", {}):
            continue
        low, high, n, unit = _interval(report, "intervals", "teacher", metric)
        row = [metric, f"{n} {unit}" if n else "–"]
        for name, m in models.items():
            low, high, _, _ = _interval(report, "intervals", name, metric)
            row.append(with_interval(m.get(metric), low, high))
        for name in students_of(report):
            value = report.get("retention_by_model", {}).get(name, {}).get(metric)
            low, high, _, _ = _interval(report, "retention_intervals", name, metric)
            row.append(with_interval(value, low, high))
        rows.append(row)
    return rows


SPEED_HEADER = ["model", "runtime", *SPEED_COLUMNS, "runs", "tokens/s vs teacher", "noise"]


def speed_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, s in report["speed"].items():
        ratio = s.get("tokens_per_s_vs_teacher")
        noise = "–"
        if "noisy" in s:
            load = s.get("other_load")
            load_text = f", other load {load:.1f}" if load is not None else ""
            noise = ("NOISY" if s["noisy"] else "ok") + (
                f" ({s.get('rounds', 1)} rounds{', stable' if s.get('stable') else ''}{load_text})"
            )
        rows.append(
            [
                name,
                s.get("runtime", "–"),
                *(fmt(s[k]) for k in SPEED_COLUMNS),
                str(s.get("runs", "–")),
                fmt(ratio) if ratio else "1",
                noise,
            ]
        )
    return rows


def noise_note(report: dict) -> str:
    if not report.get("speed_noisy"):
        return "Speed: rounds agreed within 5% and no other process loaded the CPU."
    return (
        "Speed figures are NOISY: other processes loaded the CPU or repeated rounds disagreed "
        "by more than 5%; compare ratios within this table only, and rerun on a quiet machine "
        "before quoting absolute tokens/s."
    )


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    names = list(report["models"])
    parts = [
        "# Evaluation report",
        "",
        _md_table(headline_header(report), headline_rows(report)),
        "",
        f"Held-out test split; retention = model relative to teacher (1.0 = as good as the "
        f"teacher); [95%] = bootstrap interval over items. Sample sizes: {sample_sizes(report)}.",
        noise_note(report),
        "",
        "## All metrics",
        "",
        _md_table(metric_header(report), metric_rows(report)),
        "",
        "## Speed (batch 1, greedy, medians after warm-up)",
        "",
        _md_table(SPEED_HEADER, speed_rows(report)),
        "",
        "## Sample generations",
    ]
    for sample in report["samples"]:
        parts += ["", f"**prompt:** {sample['prompt']}", ""]
        parts += [f"- *{k}:* {sample[k]}" for k in ("reference", *names) if k in sample]
    if report.get("vqa_examples"):
        parts += ["", "## VQA examples", ""]
        header = ["question", "answer", *names]
        rows = [
            [e["question"], e["answer"], *(e[n] for n in names)] for e in report["vqa_examples"]
        ]
        parts.append(_md_table(header, rows))
    if report.get("harness"):
        parts += [
            "",
            "## lm-evaluation-harness",
            "",
            "```",
            json.dumps(report["harness"], indent=1),
            "```",
        ]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    parts += ["", f"Wall time: {seconds}.", ""]
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(data: bytes, alt: str, mime: str = "image/png", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}"{size} src="data:{mime};base64,{encoded}">'


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    names = list(report["models"])
    noisy = report.get("speed_noisy")
    body = [
        "<h1>Evaluation report</h1>",
        _html_table(headline_header(report), headline_rows(report)),
        f"<p>Held-out test split; retention = model relative to the teacher (1.0 = as good as "
        f"the teacher); [95%] = bootstrap interval over items. Sample sizes: "
        f"{html.escape(sample_sizes(report))}.</p>",
        f"<p class='{'noisy' if noisy else 'quiet'}'>{html.escape(noise_note(report))}</p>",
        "<h2>All metrics</h2>",
        _html_table(metric_header(report), metric_rows(report)),
        *(_img(png, name) for name, png in figures.items() if name == "retention"),
        "<h2>Speed</h2><p>Batch 1, greedy decoding, medians after warm-up.</p>",
        _html_table(SPEED_HEADER, speed_rows(report)),
        *(_img(png, name) for name, png in figures.items() if name == "latency"),
    ]
    if "training" in figures:
        body += ["<h2>Training</h2>", _img(figures["training"], "training curves")]
    body.append("<h2>Sample generations</h2>")
    cols = ["reference", *names]
    for s in report["samples"]:
        cells = "".join(f"<td>{html.escape(s.get(c, ''))}</td>" for c in cols)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body.append(
            f"<p class='prompt'><b>prompt:</b> {html.escape(s['prompt'])}</p>"
            f"<table class='samples'><tr>{head}</tr><tr>{cells}</tr></table>"
        )
    if report.get("vqa_examples"):
        rows = []
        for e in report["vqa_examples"]:
            image = _img(Path(e["image"]).read_bytes(), e["question"], width=96)
            answers = "".join(f"<td>{html.escape(e[n])}</td>" for n in names)
            rows.append(
                f"<tr><td>{image}</td><td>{html.escape(e['question'])}</td>"
                f"<td>{html.escape(e['answer'])}</td>{answers}</tr>"
            )
        head = "".join(f"<th>{h}</th>" for h in ("image", "question", "answer", *names))
        body += ["<h2>VQA examples</h2>", f"<table><tr>{head}</tr>{''.join(rows)}</table>"]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    body.append(f"<p>Wall time: {html.escape(seconds)}.</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top}table.samples td{width:33%;font-size:90%}"
        "p.noisy{background:#fff3cd;padding:6px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nanodistill evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def figures_for(report: dict, metrics_csv: str | Path | None) -> dict[str, bytes]:
    figures = {
        "retention": png_bytes(
            retention_figure(report["retention_by_model"], report.get("retention_intervals"))
        ),
        "latency": png_bytes(latency_figure(report["speed"])),
    }
    if metrics_csv and Path(metrics_csv).is_file():
        fig = training_figure(read_metrics_csv(metrics_csv))
        if fig is not None:
            figures["training"] = png_bytes(fig)
    return figures


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no inf/nan
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    report: dict, output_dir: Path, metrics_csv: str | Path | None = None, wandb_run=None
) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots (PNG) into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = figures_for(report, metrics_csv)
    for name, png in figures.items():
        (output_dir / f"{name}.png").write_bytes(png)
    paths = {
        "json": output_dir / "report.json",
        "md": output_dir / "report.md",
        "html": output_dir / "report.html",
    }
    paths["json"].write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False))
    paths["md"].write_text(markdown(report))
    paths["html"].write_text(render_html(report, figures))
    if wandb_run is not None:
        from eval.tracking import log_report

        log_report(wandb_run, report, output_dir)
    log.info("eval report written to %s", output_dir)
    return paths
