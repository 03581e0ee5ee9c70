"""The VQA report of the vision-language recipes: report.{json,md,html} with accuracy overall and
per question type for every model, retention against the teacher, parameters by part, and a
handful of test images with each model's answer (inline PNG in the HTML)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from eval.report import _html_table, _img, _md_table, fmt

KINDS = ("overall", "shape", "colour", "yes/no")


def accuracy_rows(summary: dict) -> list[list[str]]:
    """[model, accuracy per kind (n), retention overall] rows."""
    vqa, ret = summary["vqa"], summary.get("retention", {})
    rows = []
    for name, r in vqa.items():
        cells = [
            f"{r[k]['accuracy']:.4f} (n={r[k]['questions']})" if k in r else "–" for k in KINDS
        ]
        rows.append([name, *cells, fmt(ret.get(name, {}).get("overall"))])
    return rows


def parameter_rows(summary: dict) -> list[list[str]]:
    return [
        [name, *(f"{p[k]:,}" for k in ("vision", "connector", "lm", "total"))]
        for name, p in summary.get("parameters", {}).items()
    ]


def write_vqa_report(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    acc_head = ["model", *KINDS, "retention (overall)"]
    par_head = ["model", "vision", "connector", "language model", "total"]
    examples = summary.get("examples", [])
    names = list(summary["vqa"])
    md = [
        "# VQA report (easy-VQA test split)",
        "",
        _md_table(acc_head, accuracy_rows(summary)),
        "",
        "## Parameters",
        "",
        _md_table(par_head, parameter_rows(summary)),
        "",
        "## Examples",
        "",
        _md_table(
            ["question", "answer", *names],
            [[e["question"], e["answer"], *(e.get(n, "") for n in names)] for e in examples],
        ),
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(md))
    rows = []
    for e in examples:
        answers = "".join(f"<td>{html.escape(e.get(n, ''))}</td>" for n in names)
        image = _img(Path(e["image"]).read_bytes(), e["question"], width=96)
        rows.append(
            f"<tr><td>{image}</td><td>{html.escape(e['question'])}</td>"
            f"<td>{html.escape(e['answer'])}</td>{answers}</tr>"
        )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("image", "question", "answer", *names))
    body = [
        "<h1>VQA report (easy-VQA test split)</h1>",
        "<p>Greedy short answers, VQAv2-normalised exact match; retention = accuracy ÷ the "
        "teacher's.</p>",
        _html_table(acc_head, accuracy_rows(summary)),
        "<h2>Parameters</h2>",
        _html_table(par_head, parameter_rows(summary)),
        "<h2>VQA examples</h2>",
        f"<table><tr>{head}</tr>{''.join(rows)}</table>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
    )
    (out_dir / "report.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nanodistill VQA</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
