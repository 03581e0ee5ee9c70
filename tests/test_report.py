"""The evaluation suite end to end on tiny models: report files exist, parse and carry the
stable keys; the CLI, the training-run eval stage and wandb logging write them too."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.retention import RETENTION
from eval.suite import EvalSettings, evaluate

SMALL = {
    "seq_len": 64,
    "blocks": 2,
    "probe_paragraphs": 4,
    "prompts": 2,
    "prompt_tokens": 8,
    "new_tokens": 8,
    "speed_prompts": 1,
    "speed_new_tokens": 4,
    "speed_repeats": 1,
    "samples_in_report": 2,
}
TEXT_METRICS = [m for m in RETENTION if m != "vqa_accuracy"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_student_dir(tmp_path_factory, tokenizer) -> Path:
    from distill.models.tiny import save_tiny_llama

    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-student"), tokenizer=tokenizer, seed=1, num_hidden_layers=2
    )


def write_metrics_csv(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,step,train/loss,val/loss", "0,1,5.0,", "0,2,4.0,", "0,2,,4.5", "0,3,3.0,"]
    path.write_text("\n".join(rows) + "\n")


def check_report(out: Path, students: list[str]) -> dict:
    report = json.loads((out / "report.json").read_text())
    names = ["teacher", *students]
    assert list(report["models"]) == names
    for name in names:
        for metric in TEXT_METRICS:
            assert isinstance(report["models"][name][metric], float), (name, metric)
        for metric in ("ttft_ms", "tpot_ms", "tokens_per_s", "peak_mem_mb"):
            assert report["speed"][name][metric] > 0
    assert set(report["retention"]) == set(TEXT_METRICS)
    assert report["models"]["teacher"]["top1_agreement"] == 1.0
    assert report["retention"]["perplexity"] == pytest.approx(
        report["models"]["teacher"]["perplexity"] / report["models"]["student"]["perplexity"]
    )
    assert report["speed"]["student"]["tokens_per_s_vs_teacher"] == pytest.approx(
        report["speed"]["student"]["tokens_per_s"] / report["speed"]["teacher"]["tokens_per_s"]
    )
    assert report["config"]["eval"]["blocks"] == SMALL["blocks"]
    assert "vqa_accuracy" not in report["models"]["teacher"]  # text models: no VQA section

    for name in names:  # every metric: its sample size and a 95% bootstrap interval
        for metric in TEXT_METRICS:
            rec = report["intervals"][name][metric]
            assert rec["value"] == pytest.approx(report["models"][name][metric]), (name, metric)
            assert rec["n"] >= 1 and rec["unit"]
            if rec["n"] >= 2:
                assert rec["low"] <= rec["high"]
    blocks = report["intervals"]["student"]["perplexity"]
    assert blocks["n"] == SMALL["blocks"] and blocks["unit"] == "blocks"
    assert blocks["low"] < blocks["value"] < blocks["high"]
    for student in students:
        assert set(report["retention_intervals"][student]) == set(TEXT_METRICS)
    for name in names:
        speed = report["speed"][name]
        assert speed["runs"] >= 1 and isinstance(speed["noisy"], bool)
    assert report["speed_noisy"] == any(report["speed"][n]["noisy"] for n in names)

    md = (out / "report.md").read_text()
    assert "| perplexity |" in md and "## Speed" in md and "## Sample generations" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    # the first screen is the answer: sizes, bytes, speed, retention of every model, first
    first_table = page[page.index("<table>") : page.index("</table>")]
    for column in ("parameters", "weights MB", "tokens/s", "perplexity retention"):
        assert column in first_table
    for name in names:
        assert f"<td>{name}</td>" in first_table
    assert page.index("perplexity retention") < page.index("All metrics")
    assert "Sample sizes:" in page and ("NOISY" in page) == report["speed_noisy"]
    # self-contained: every image inline, nothing fetched
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG")
    assert report["samples"][0]["prompt"][:20] in page.replace("&#x27;", "'").replace("&quot;", '"')
    return report


def test_evaluate_writes_report_with_training_curves_and_wandb(
    tmp_path, tokenizer, tiny_teacher_dir, tiny_student_dir
):
    import wandb

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    csv = tmp_path / "metrics" / "metrics.csv"
    write_metrics_csv(csv)
    run = wandb.init(project="nanodistill-test", dir=str(tmp_path), mode="offline")
    try:
        report = evaluate(
            EvalSettings(**SMALL),
            teacher,
            {"student": student},
            tokenizer,
            tmp_path / "report",
            metrics_csv=csv,
            wandb_run=run,
        )
        summary = dict(run.summary)
    finally:
        run.finish()
    check_report(tmp_path / "report", ["student"])
    assert {"retention.png", "latency.png", "training.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }
    assert report["models"]["student"]["perplexity"] != report["models"]["teacher"]["perplexity"]
    assert summary["eval/retention/perplexity"] == pytest.approx(report["retention"]["perplexity"])
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_training_plots_keep_every_curve_visible():
    """train/kd equal to train/loss (pure KD) on one axis would hide a curve: one panel each,
    plus validation perplexity; the retention legend sits outside the bars."""
    from eval.plots import retention_figure, training_figure

    series = {
        "train/loss": [(1, 3.0), (2, 2.0)],
        "train/kd": [(1, 3.0), (2, 2.0)],
        "val/perplexity": [(2, 40.0)],
        "train/lr": [(1, 1e-4)],
    }
    fig = training_figure(series)
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_visible())
    assert titles == ["train/kd", "train/loss", "val/perplexity"]
    fig = retention_figure({"student": {"perplexity": 0.5}, "student_int8": {"perplexity": 0.49}})
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the plot area, over no bar


def test_bootstrap_interval_covers_the_statistic_and_shrinks_with_more_items():
    from eval.intervals import metric_interval, retention_interval
    from eval.retention import RETENTION

    coin = [1.0, 0.0] * 8  # 16 paragraphs, half right: a coin flip
    small = metric_interval("coherence_probe", coin)
    assert small["value"] == 0.5 and small["n"] == 16
    assert small["low"] < 0.35 and small["high"] > 0.65  # wide: 0.5 on 16 says little
    large = metric_interval("coherence_probe", coin * 16)
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 2
    # distinct-n: a resample keeps each continuation once (a duplicate would halve the value)
    distinct = metric_interval("distinct_2", [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert distinct["value"] == distinct["low"] == distinct["high"] == 1.0
    teacher = [(2.0, 10)] * 8
    student = [(3.0, 10), (3.4, 10)] * 4
    ret = retention_interval("perplexity", teacher, student, RETENTION["perplexity"][0])
    assert ret["low"] <= ret["value"] <= ret["high"] < 1


def test_evaluate_needs_a_student(tokenizer, tiny_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with pytest.raises(ValueError, match="named 'student'"):
        evaluate(EvalSettings(**SMALL), teacher, {"other": teacher}, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="blocks"):
        EvalSettings(blocks=0)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_cli_evaluates_run_dir_with_int8_student(tmp_path, tiny_teacher_dir, tiny_student_dir):
    """`run_dir=` finds student/, student-qat/ (as int8) and metrics/metrics.csv by itself."""
    import shutil

    from distill.quant import build_scheme, save_int8, to_int8

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_student_dir, run_dir / "student")
    int8 = to_int8(
        AutoModelForCausalLM.from_pretrained(tiny_student_dir), build_scheme({"embeddings": True})
    )
    save_int8(int8, run_dir / "student-qat")  # compressed-tensors INT8, as the QAT stage writes
    write_metrics_csv(run_dir / "metrics" / "metrics.csv")
    overrides = [f"eval.{k}={v}" for k, v in SMALL.items()]
    result = run_cli(
        f"run_dir={run_dir}",
        f"teacher={tiny_teacher_dir}",
        "eval=default",
        *overrides,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retention" in result.stdout
    assert "eval=default: 2 blocks × 64 tokens" in result.stdout  # the plan, before loading
    assert "min for a ~135M teacher" in result.stdout.splitlines()[0]
    report = check_report(run_dir / "report", ["student", "student_int8"])
    assert {s["runtime"] for s in report["speed"].values()} == {"serve engine"}
    assert report["config"]["int8"] == str(run_dir / "student-qat")
    # int8 weights of the same student: close to it, not identical
    fp32, q8 = (report["models"][n]["perplexity"] for n in ("student", "student_int8"))
    assert q8 != fp32 and q8 == pytest.approx(fp32, rel=0.05)
    assert report["speed"]["student_int8"]["weights_mb"] < report["speed"]["student"]["weights_mb"]
    assert (run_dir / "report" / "training.png").exists()


def test_int8_student_runs_on_int8_kernels(tmp_path, tiny_student_dir):
    from distill.quant import build_scheme, save_int8, to_int8
    from eval.models import load_int8
    from serve.int8 import Int8Linear

    save_int8(
        to_int8(
            AutoModelForCausalLM.from_pretrained(tiny_student_dir),
            build_scheme({"embeddings": True}),
        ),
        tmp_path,
    )
    fast = load_int8(str(tmp_path), "cpu")
    plain = load_int8(str(tmp_path), "cpu", int8_kernels=False)
    assert isinstance(fast.lm_head, Int8Linear)
    from eval.speed import weight_bytes

    # int8 weight bytes are counted whether packed for fbgemm or kept as int8 tensors
    fp32 = weight_bytes(AutoModelForCausalLM.from_pretrained(tiny_student_dir))
    assert weight_bytes(fast) == pytest.approx(weight_bytes(plain), rel=0.05)
    assert weight_bytes(fast) < 0.6 * fp32
    assert isinstance(fast.model.layers[0].mlp.down_proj, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in plain.modules())
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fast(ids).logits, plain(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_cli_rejects_bad_input(tmp_path):
    from distill.commands.eval import find_run_files, parse_args

    with pytest.raises(SystemExit, match="no config.json"):
        find_run_files({"student": str(tmp_path)})
    with pytest.raises(SystemExit, match="needs student"):
        find_run_files({})
    with pytest.raises(SystemExit, match="run_dir=.*no such directory"):
        find_run_files({"run_dir": str(tmp_path / "missing")})
    with pytest.raises(SystemExit, match="unknown argument 'studnet'"):
        parse_args(["studnet=x"])
    with pytest.raises(SystemExit, match="expected key=value"):
        parse_args(["--student"])
    args, overrides = parse_args(["student=a", "eval.blocks=3", "int8=b"])
    assert args == {"student": "a", "int8": "b"} and overrides == ["eval.blocks=3"]


def test_training_eval_stage_uses_recipe_config_and_skips_when_done(
    tmp_path, tokenizer, tiny_teacher_dir, tiny_student_dir
):
    from distill.hydra_app import compose_recipe
    from eval.stage import eval_stage

    overrides = [f"eval.{k}={v}" for k, v in SMALL.items()]
    data = ["data.seq_len=64", f"data.max_eval_blocks={SMALL['blocks']}"]  # eval scores these
    cfg = compose_recipe(overrides=["logger=csv", *data, *overrides])
    assert cfg.eval._target_ == "eval.suite.EvalSettings"
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    report = eval_stage(cfg, teacher, student, tokenizer, tmp_path)
    assert report is not None and (tmp_path / "report" / "report.html").exists()
    assert report["config"]["eval"]["test_fraction"] == cfg.data.test_fraction
    assert eval_stage(cfg, teacher, student, tokenizer, tmp_path) is None  # done: skipped
