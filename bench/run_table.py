"""The default run's tables for README / docs/results.md, read from a finished run directory
(its metrics.json and report/report.json), so the numbers are copied by code, not by hand.

    flock /tmp/nanodistill-heavy.lock python -m distill train
    python bench/run_table.py outputs/nano-text/<stamp>

Prints markdown: teacher / fp32 student / int8 student side by side (parameters, weight MB as
served, held-out perplexity and its retention with 95% bootstrap intervals, top-1 agreement,
decode tokens/s on the serve engine), every model of metrics.json, the stage times and every
report metric with its sample size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {
    "teacher": "teacher (fp32)",
    "student": "student (fp32)",
    "student_int8": "student (int8)",
}


def with_interval(rec: dict, fmt: str = "{:.2f}") -> str:
    if rec.get("low") is None:
        return fmt.format(rec["value"])
    return f"{fmt.format(rec['value'])} [{fmt.format(rec['low'])}, {fmt.format(rec['high'])}]"


def headline(report: dict) -> list[str]:
    lines = [
        "| model | parameters | weights MB | held-out perplexity [95%] | perplexity retention [95%]"
        " | top-1 agreement [95%] | decode tokens/s [95%] | vs teacher |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        if name not in report["models"]:
            continue
        m, s, iv = report["models"][name], report["speed"][name], report["intervals"][name]
        ret = (
            "1"
            if name == "teacher"
            else with_interval(report["retention_intervals"][name]["perplexity"], "{:.3f}")
        )
        tps = f"{s['tokens_per_s']:.1f}"
        if s.get("tokens_per_s_low") is not None:
            tps += f" [{s['tokens_per_s_low']:.1f}, {s['tokens_per_s_high']:.1f}]"
        tps += " (noisy)" if s.get("noisy") else ""
        ratio = s.get("tokens_per_s_vs_teacher") or 1.0
        lines.append(
            f"| {label} | {m['parameters']:,} | {s['weights_mb']:.0f} | "
            f"{with_interval(iv['perplexity'])} | {ret} | "
            f"{with_interval(iv['top1_agreement'], '{:.3f}')} | {tps} | {ratio:.2f}× |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    run = parser.parse_args().run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    report = json.loads((run / "report" / "report.json").read_text())
    out = [*headline(report), ""]
    out += ["| metrics.json | parameters | perplexity | tokens |", "|---|---:|---:|---:|"]
    out += [
        f"| {k} | {v['parameters']:,} | {v['perplexity']:.2f} | {v['tokens']:,} |"
        for k, v in metrics["models"].items()
    ]
    out += ["", "| stage | seconds |", "|---|---:|"]
    out += [f"| {k} | {v:.0f} |" for k, v in metrics["stage_seconds"].items()]
    students = [n for n in ("student", "student_int8") if n in report["models"]]
    out += [
        "",
        "| metric | n | " + " | ".join(LABELS[n] for n in report["models"])
        + " | " + " | ".join(f"retention {LABELS[n]}" for n in students) + " |",
        "|---|---|" + "---:|" * (len(report["models"]) + len(students)),
    ]  # fmt: skip
    for metric, rec in report["intervals"]["teacher"].items():
        cells = [with_interval(report["intervals"][n][metric], "{:.4g}") for n in report["models"]]
        cells += [
            with_interval(report["retention_intervals"][n][metric], "{:.3g}") for n in students
        ]
        out.append(f"| {metric} | {rec['n']} {rec['unit']} | " + " | ".join(cells) + " |")
    noisy = report.get("speed_noisy")
    out += ["", f"speed noisy: {noisy}; load seen: "
            + ", ".join(f"{n} {report['speed'][n].get('other_load')}" for n in report["speed"])]  # fmt: skip
    print("\n".join(out))


if __name__ == "__main__":
    main()
