"""Parameter-budget search, cached scores, the prune stage and `python -m distill prune`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from distill.models.loading import count_parameters
from distill.models.tiny import tiny_llama_config
from distill.paths import configs_dir
from distill.prune.importance import calibration_scores
from distill.prune.plan import Dims, head_dim_of, make_plan
from distill.prune.search import SearchSpace, print_candidates, search_shape
from distill.prune.slicing import slice_model

SPACE = SearchSpace(
    hidden_step=8, intermediate_step=16, min_hidden_fraction=0.5, min_intermediate_fraction=0.25
)


@pytest.fixture(scope="module")
def teacher_and_scores():
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=512, hidden_size=128, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=2, intermediate_size=384)  # fmt: skip
    teacher = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    return teacher, calibration_scores(teacher, [ids], progress=False)


@pytest.mark.parametrize("target", [0.35, 0.5, 0.7])
def test_budget_search_lands_within_3_percent(teacher_and_scores, target):
    teacher, scores = teacher_and_scores
    chosen, candidates = search_shape(teacher, scores, target, SPACE)
    plan = make_plan(scores, Dims.of(teacher.config), chosen.dims, head_dim_of(teacher.config))
    student = slice_model(teacher, plan)
    fraction = count_parameters(student) / count_parameters(teacher)
    assert count_parameters(student) == chosen.parameters
    assert 0.97 * target <= fraction <= target
    # The rule: the deepest feasible shape, then the most importance retained.
    feasible = [c for c in candidates if c.retained == c.retained]  # NaN = outside the budget
    assert chosen.dims.num_hidden_layers == max(c.dims.num_hidden_layers for c in feasible)
    same_depth = [c for c in feasible if c.dims.num_hidden_layers == chosen.dims.num_hidden_layers]
    assert chosen.retained == max(c.retained for c in same_depth)
    assert len(candidates) > len(feasible) > 1


def test_search_respects_pinned_dims_and_head_pruning(teacher_and_scores):
    teacher, scores = teacher_and_scores
    pinned = {"num_hidden_layers": 6}
    space = SearchSpace(**{**SPACE.__dict__, "prune_heads": True})
    chosen, candidates = search_shape(teacher, scores, 0.5, space, pinned)
    assert {c.dims.num_hidden_layers for c in candidates} == {6}
    assert {(c.dims.num_attention_heads, c.dims.num_key_value_heads) for c in candidates} > {(8, 2)}
    plan = make_plan(scores, Dims.of(teacher.config), chosen.dims, head_dim_of(teacher.config))
    student = slice_model(teacher, plan)
    assert student(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 512)


def test_unreachable_budget_is_a_clear_error(teacher_and_scores):
    teacher, scores = teacher_and_scores
    with pytest.raises(ValueError, match="no candidate shape.*closest"):
        search_shape(teacher, scores, 0.05, SPACE)
    with pytest.raises(ValueError, match="fraction in"):
        search_shape(teacher, scores, 1.5, SPACE)
    with pytest.raises(ValueError, match="unknown student.search keys \\['width_step'\\]"):
        SearchSpace.from_dict({"width_step": 64})
    with pytest.raises(ValueError, match="tolerance"):
        SearchSpace(tolerance=1.5)


def test_candidates_table_lists_the_choice(teacher_and_scores):
    from rich.console import Console

    teacher, scores = teacher_and_scores
    chosen, candidates = search_shape(teacher, scores, 0.5, SPACE)
    console = Console(record=True, width=120)
    print_candidates(candidates, 0.5, console=console)
    text = console.export_text()
    assert "student shapes within budget" in text and f"{chosen.parameters:,}" in text


def student_cfg(**overrides):
    """The real configs/student/minitron-half.yaml with floors lowered for a 64-wide teacher."""
    cfg = OmegaConf.load(configs_dir() / "student" / "minitron-half.yaml")
    cfg.search.min_hidden_fraction = 0.25
    cfg.search.hidden_step = 4  # the 49k-token embedding table dominates this tiny teacher
    cfg.search.intermediate_step = 16
    cfg.calibration_blocks = 4
    cfg.calibration_batch_size = 2
    return OmegaConf.merge(cfg, overrides)


def test_cached_scores_are_reused_without_a_calibration_pass(tmp_path, tiny_teacher_dir, tokenizer):
    from distill.prune.stage import prune_stage

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    forwards = []
    teacher.model.register_forward_pre_hook(lambda module, args: forwards.append(1))  # any pass
    ids = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(blocks={"train": ids})

    first = prune_stage(student_cfg(params=0.5), teacher, tokenizer, data, tmp_path / "a")
    assert len(forwards) == 2  # 4 calibration blocks in batches of 2
    cache = tmp_path / "a" / "importance.pt"
    assert set(torch.load(cache)) >= {"layers", "neurons", "heads", "channels", "meta"}

    second = prune_stage(
        student_cfg(params=0.75, importance_path=str(cache)),
        teacher,
        tokenizer,
        data,
        tmp_path / "b",
    )
    assert len(forwards) == 2  # no second pass
    assert count_parameters(second) > count_parameters(first)
    record = json.loads((tmp_path / "b" / "student-init" / "prune.json").read_text())
    assert record["importance_cache"] == str(cache)
    assert 0.97 * 0.75 <= record["fraction"] <= 0.75

    # Scores made with other calibration settings are recomputed, not silently reused.
    cfg = student_cfg(params=0.75, importance_path=str(cache), calibration_blocks=2)
    prune_stage(cfg, teacher, tokenizer, data, tmp_path / "c")
    assert len(forwards) == 3


def test_explicit_dims_without_budget(tmp_path, tiny_teacher_dir, tokenizer):
    from distill.prune.stage import prune_stage

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    data = SimpleNamespace(blocks={"train": torch.randint(0, len(tokenizer), (4, 16))})
    cfg = student_cfg(params=None, num_hidden_layers=3, intermediate_size=64)
    student = prune_stage(cfg, teacher, tokenizer, data, tmp_path)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (3, 64)
    assert student.config.hidden_size == teacher.config.hidden_size
    with pytest.raises(ValueError, match="set a parameter budget"):
        prune_stage(student_cfg(params=None), teacher, tokenizer, data, tmp_path / "none")


def test_prune_cli_writes_hf_student(tmp_path, tiny_teacher_dir):
    cmd = [
        sys.executable, "-m", "distill", "prune",
        f"teacher.name_or_path={tiny_teacher_dir}", f"output_root={tmp_path / 'outputs'}",
        "student=minitron-half", "student.params=0.75", "student.search.min_hidden_fraction=0.25",
        "student.search.hidden_step=4", "student.search.intermediate_step=16", "student.calibration_blocks=4",
        "data.seq_len=32", "data.max_eval_blocks=2", "logger=none",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = (tmp_path / "outputs" / "nano-text").iterdir()
    assert "student shapes within budget" in result.stderr + result.stdout
    out = Path(run_dir) / "student-init"
    for name in ("config.json", "prune.json", "search.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert (Path(run_dir) / "importance.pt").exists()
    student = AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "prune.json").read_text())
    assert count_parameters(student) == record["student_parameters"]
    assert 0.97 * 0.75 <= record["fraction"] <= 0.75
