"""Bad settings fail before anything heavy: the knob, its value and the allowed range.

The teacher here is a directory holding only a config.json (no weights, no tokenizer), so a
command that got past validation to its first model or tokenizer load would fail with an
OSError instead of the ConfigError these tests expect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.hydra_app import compose_recipe
from distill.validate import ConfigError, check_eval_command, check_export, check_recipe

CUDA = torch.cuda.is_available()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def config_only_teacher(tmp_path_factory) -> Path:
    """A tiny Llama's config.json alone: vocab 49152, context 2048, 4 layers, 64 wide, 4/2 heads."""
    from distill.models.tiny import tiny_llama_config

    out = tmp_path_factory.mktemp("config-only-teacher")
    tiny_llama_config().save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    return out


def problems(command: str, teacher: Path | None, *overrides: str) -> list[str]:
    """The problem lines check_recipe reports for the default recipe plus `overrides`."""
    # student=depth: the default student (a 0.5 budget) has no shape on this embedding-heavy
    # tiny teacher, which would add its own problem line to every case
    base = [f"teacher.name_or_path={teacher}", "student=depth"] if teacher else []
    if command == "cache-teacher":
        base.append("loss=topk_cached")
    cfg = compose_recipe(overrides=[*base, *overrides])
    with pytest.raises(ConfigError) as e:
        check_recipe(cfg, command)
    assert str(e.value).startswith(f"{command}: {len(e.value.problems)} invalid setting(s)")
    return e.value.problems


TINY = [  # (command, overrides, the exact line naming the knob) against the config-only teacher
    (
        "cache-teacher",
        ["loss.top_k=100000"],
        "loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)",
    ),
    (
        "cache-teacher",
        ["loss.top_k=0"],
        "loss.top_k=0: must be an integer in [1, 49152] (the teacher's vocabulary)",
    ),
    ("cache-teacher", ["loss.temperature=0"], "loss.temperature=0: must be a number > 0"),
    ("cache-teacher", ["eval_batch_size=0"], "eval_batch_size=0: must be an integer ≥ 1"),
    (
        "cache-teacher",
        ["loss.cache=null"],
        "loss.cache=None: must be a directory (pass loss=topk_cached)",
    ),
    (
        "prune",
        ["data.seq_len=4096"],
        "data.seq_len=4096: must be an integer in [2, 2048] (the teacher's context length)",
    ),
    ("prune", ["data.batch_size=0"], "data.batch_size=0: must be an integer ≥ 1"),
    (
        "prune",
        ["data.validation_fraction=0.6", "data.test_fraction=0.5"],
        "data.validation_fraction + data.test_fraction=1.1: must be < 1 (the rest is the training split)",
    ),
    (
        "prune",
        ["data.source=hf"],
        "data.hf.path=None: must be set for data.source=hf (a datasets path or 'json')",
    ),
    (
        "prune",
        ["student.params=1.5"],
        "student.params=1.5: must be a number in (0, 1] (a fraction of the teacher)",
    ),
    (
        "prune",
        ["student.params=0"],
        "student.params=0: must be a number in (0, 1] (a fraction of the teacher)",
    ),
    (
        "prune",
        ["student.num_hidden_layers=20"],  # the depth default, but this teacher has 4
        "student.num_hidden_layers=20: must be an integer in [1, 4] (the teacher's num_hidden_layers) or null",
    ),
    (
        "prune",
        ["student.num_hidden_layers=2", "student.hidden_size=65"],
        "student.hidden_size=65: must be an integer in [1, 64] (the teacher's hidden_size) or null",
    ),
    (
        "prune",
        ["student.num_hidden_layers=2", "student.num_attention_heads=3"],
        "student: num_attention_heads=3 must be a multiple of num_key_value_heads=2 (GQA)",
    ),
    (
        "prune",
        ["student.num_hidden_layers=null"],
        "student.params=None: set a parameter budget in (0, 1] or at least one target dim "
        "(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)",
    ),
    (
        "prune",
        ["student.num_hidden_layers=2", "student.calibration_blocks=0"],
        "student.calibration_blocks=0: must be an integer ≥ 1",
    ),
    (
        "prune",
        ["student.init=grow"],
        "student.init='grow': must be one of ['prune', 'random', 'pretrained']",
    ),
    (
        "prune",
        ["student.init=pretrained"],
        "student.name_or_path=None: must be a model name, a Hugging Face directory or a .gguf file",
    ),
    (
        "prune",
        ["student.num_hidden_layers=2", "student.search.tolerance=2"],
        "student.search.tolerance=2 must be in [0, 1)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "trainer.max_steps=abc"],
        "trainer.max_steps='abc': must be an integer ≥ 1",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "trainer.max_steps=0"],
        "trainer.max_steps=0: must be an integer ≥ 1",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "optim.lr=0"],
        "optim.lr=0: must be a number in (0, 1]",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "optim.lr=5"],
        "optim.lr=5: must be a number in (0, 1]",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "optim.betas=[0.9,1.5]"],
        "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "optim.optimizer=sgd"],
        "optim.optimizer='sgd': must be one of ['adamw', 'adamw8bit']",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "loss=fkl", "loss.kd_weight=0"],
        "loss.kd_weight=0: must be > 0 when loss.ce_weight=0 (no loss)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "loss=jsd", "loss.beta=1"],
        "loss.beta=1: must be a number in (0, 1)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "loss.chunk_size=0"],
        "loss.chunk_size=0: must be an integer ≥ 1",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "quant=qat-int8", "quant.steps=0"],
        "quant.steps=0: must be an integer ≥ 1",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "quant=ptq-int8", "quant.exclude=['(']"],
        "quant.exclude='(': must be a regex (missing ), unterminated subpattern at position 0)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "quant.method=int4"],
        "quant.method='int4': must be one of ['none', 'ptq', 'qat']",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "eval.top_p=0"],
        "eval.top_p=0: must be a number in (0, 1]",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "eval.seq_len=4096"],
        "eval.seq_len=4096: must be an integer in [2, 2048] (the teacher's context length)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "eval.blocks=0"],
        "eval: eval.blocks must be ≥ 1, got 0",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "serve.pricing.input_per_1m=-1"],
        "serve.pricing.input_per_1m=-1: must be a number ≥ 0 (per 1M tokens)",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "serve.limits.max_output_tokens=0"],
        "serve.limits.max_output_tokens=0: must be an integer ≥ 1",
    ),
    (
        "train",
        ["student.num_hidden_layers=2", "checkpoint_every_n_steps=0"],
        "checkpoint_every_n_steps=0: must be an integer ≥ 1",
    ),
]


@pytest.mark.parametrize(("command", "overrides", "line"), TINY)
def test_bad_knob_is_named_with_value_and_range(config_only_teacher, command, overrides, line):
    assert line in problems(command, config_only_teacher, *overrides)


def test_teacher_reference_problems(tmp_path):
    assert problems("prune", None, "teacher.name_or_path=/nonexistent/dir") == [
        "teacher.name_or_path='/nonexistent/dir': no such directory or file"
    ]
    (tmp_path / "empty").mkdir()
    (line,) = problems("prune", None, f"teacher.name_or_path={tmp_path / 'empty'}")
    assert line.startswith(f"teacher.name_or_path='{tmp_path / 'empty'}': ")
    assert "has no config.json" in line
    (line,) = problems("prune", None, "teacher.dtype=float8")
    assert line.startswith("teacher.dtype='float8': must be one of [")


def test_shape_problems_found_from_the_config_alone(config_only_teacher):
    """Explicit dims the family rejects, and a budget no shape can meet, before calibration."""
    (line,) = problems(
        "prune", config_only_teacher, "student.num_hidden_layers=2", "student.hidden_size=62"
    )
    assert line.startswith(
        "student dims={'num_hidden_layers': 2, 'hidden_size': 62}: rejected by llama: "
    )
    # default floors keep ≥ 75% of the hidden channels and ≥ 50% of the layers
    (line,) = problems(
        "prune", config_only_teacher, "student.num_hidden_layers=null", "student.params=0.05"
    )
    assert line.startswith("student.params=0.05: no candidate shape within -3% of 0.05 × ")


def test_all_problems_are_reported_together(config_only_teacher):
    lines = problems(
        "train",
        config_only_teacher,
        "student.num_hidden_layers=2",
        "trainer.max_steps=abc",
        "optim.lr=-1",
        "loss.top_k=100000",
    )
    assert lines == [
        "loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)",
        "optim.lr=-1: must be a number in (0, 1]",
        "trainer.max_steps='abc': must be an integer ≥ 1",
    ]


def test_offline_teacher_cache_settings(config_only_teacher, tmp_path):
    cache = tmp_path / "cache"
    lines = problems(
        "train", config_only_teacher, "student.num_hidden_layers=2", f"loss.cache={cache}"
    )
    assert lines == [
        f"loss.cache='{cache}': no teacher cache there (meta.json missing); build it first with "
        "`python -m distill cache-teacher` and the same data settings, or set "
        "build_teacher_cache=true to build it in the run"
    ]
    built_in_run = [f"teacher.name_or_path={config_only_teacher}", "student=depth",
                    "student.num_hidden_layers=2", f"loss.cache={cache}"]  # fmt: skip
    check_recipe(compose_recipe(overrides=[*built_in_run, "+build_teacher_cache=true"]), "train")
    built_in_run = built_in_run[2:]
    lines = problems("train", config_only_teacher, *built_in_run, "+build_teacher_cache=yes")
    assert lines[0] == "build_teacher_cache='yes': must be true or false"
    assert len(lines) == 2 and "meta.json missing" in lines[1]  # "yes" builds nothing
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"temperature": 1.0}))
    lines = problems(
        "train",
        config_only_teacher,
        "student.num_hidden_layers=2",
        "loss=gkd",
        f"loss.cache={cache}",
        "loss.temperature=2.0",
    )
    assert lines == [
        "loss.on_policy_fraction=0.5: must be 0 with loss.cache (scoring student samples needs a "
        "live teacher)",
        f"loss.temperature=2.0: must equal the cache's temperature 1.0 ({cache}); rebuild the "
        "cache or set it",
    ]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_only_settings_refused_without_cuda(config_only_teacher):
    lines = problems(
        "train",
        config_only_teacher,
        "student.num_hidden_layers=2",
        "trainer=gpu",
        "teacher.load_in_8bit=true",
        "optim.optimizer=adamw8bit",
    )
    assert lines == [
        "teacher.load_in_8bit=True: needs CUDA (bitsandbytes), and none is available",
        "optim.optimizer='adamw8bit': needs CUDA (bitsandbytes), and none is available",
        "trainer.accelerator='gpu': needs CUDA, and none is available (trainer=cpu)",
    ]


STUDENTS = ["depth", "minitron-half", "half-15x504"]
LOSSES = sorted(p.stem for p in (CONFIGS / "loss").glob("*.yaml") if p.stem != "topk_cached")


@pytest.mark.parametrize("student", STUDENTS)
def test_every_shipped_config_validates(student):
    """No false alarms: the packaged teacher with each student, loss, quant and eval config."""
    assert "fkl" in LOSSES and len(LOSSES) >= 9
    for loss in LOSSES:
        check_recipe(compose_recipe(overrides=[f"student={student}", f"loss={loss}"]), "train")
    for quant in sorted(p.stem for p in (CONFIGS / "quant").glob("*.yaml")):
        for eval_preset in ("default", "full"):
            overrides = [f"student={student}", f"quant={quant}", f"eval={eval_preset}"]
            check_recipe(compose_recipe(overrides=overrides), "train")
    check_recipe(compose_recipe(overrides=[f"student={student}"]), "prune")
    check_recipe(compose_recipe(overrides=["loss=topk_cached"]), "cache-teacher")


def test_budget_override_on_the_depth_student(tmp_path, one_thread):
    """Issue 13: `prune student.params=0.5` on student=depth crashed after calibration."""
    from transformers import LlamaForCausalLM

    from distill.models.tiny import tiny_llama_config
    from distill.prune.importance import calibration_scores
    from distill.prune.stage import choose_dims

    config = tiny_llama_config(vocab_size=256)  # small table: the layers carry the budget
    config.save_pretrained(tmp_path / "teacher")
    cfg = compose_recipe(
        overrides=[
            f"teacher.name_or_path={tmp_path / 'teacher'}",
            "student=minitron-half",  # the budget search (the default pins 15 x 504)
            "student.params=0.53",  # a shape of this tiny teacher lands within 3% below
            "student.num_hidden_layers=null",
        ]
    )
    check_recipe(cfg, "prune")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    scores = calibration_scores(teacher, [torch.randint(0, 256, (2, 16))])
    student = OmegaConf.to_container(cfg.student, resolve=True)
    del student["search"]  # the depth config before it carried the search block
    dims = choose_dims(OmegaConf.create(student), teacher, scores, tmp_path / "student-init")
    assert dims.num_hidden_layers <= 4 and dims.hidden_size <= 64
    assert json.loads((tmp_path / "student-init" / "search.json").read_text())["chosen"]


@pytest.mark.parametrize("command", ["cache-teacher", "prune", "train"])
def test_commands_validate_before_loading_anything(config_only_teacher, tmp_path, command):
    """The entry points raise ConfigError; past validation they would hit the weightless teacher."""
    from distill.commands import cache_teacher, prune
    from distill.train import run as train_run

    overrides = [f"teacher.name_or_path={config_only_teacher}", f"output_root={tmp_path}"]
    overrides += ["loss=topk_cached", "loss.top_k=100000"] if command == "cache-teacher" else []
    overrides += ["student.params=1.5"] if command != "cache-teacher" else []
    cfg = compose_recipe(overrides=overrides)
    run_dir = tmp_path / "run"
    entry = {
        "cache-teacher": lambda: cache_teacher.cache(cfg),
        "prune": lambda: prune.run(cfg, run_dir),
        "train": lambda: train_run(cfg, run_dir),
    }[command]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        entry()
    assert time.perf_counter() - start < 30
    expected = {
        "cache-teacher": "loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)",
        "prune": "student.params=1.5: must be a number in (0, 1] (a fraction of the teacher)",
        "train": "student.params=1.5: must be a number in (0, 1] (a fraction of the teacher)",
    }[command]
    assert expected in e.value.problems
    assert not run_dir.exists() and not (tmp_path / "teacher-cache").exists()  # nothing written


def test_cli_reports_the_knob_without_a_traceback(tmp_path):
    """The issue's command: top_k beyond the packaged teacher's vocabulary, via the real CLI."""
    cmd = [sys.executable, "-m", "distill", "cache-teacher", "loss.top_k=100000"]
    cmd.append(f"output_root={tmp_path}")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert (
        "  loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)"
        in result.stderr.splitlines()
    )
    assert "Traceback" not in result.stderr
    written = [p.name for p in tmp_path.glob("teacher-cache/**/*") if p.is_file()]
    assert not [n for n in written if n.endswith(".safetensors") or n == "meta.json"], written


def test_eval_and_export_commands(config_only_teacher, tmp_path, capsys):
    from distill.__main__ import main

    eval_cfg = OmegaConf.load(CONFIGS / "eval" / "default.yaml")
    settings = check_eval_command(eval_cfg, str(config_only_teacher), "cpu")
    assert settings.seq_len == 256
    bad = OmegaConf.merge(eval_cfg, {"temperature": 0, "seq_len": 4096})
    with pytest.raises(ConfigError) as e:
        check_eval_command(bad, str(config_only_teacher), "cpu")
    assert e.value.problems == [
        "eval.seq_len=4096: must be an integer in [2, 2048] (the teacher's context length)",
        "eval.temperature=0: must be a number > 0",
    ]
    with pytest.raises(ConfigError) as e:
        check_eval_command(OmegaConf.merge(eval_cfg, {"prompts": 0}), "/nonexistent/t", "gpu0")
    assert e.value.problems == [
        "device='gpu0': must be auto, cpu, mps, cuda or cuda:<index>",
        "teacher='/nonexistent/t': no such directory or file",
        "eval: eval.prompts must be ≥ 1, got 0",
    ]
    # the eval CLI: exit status 2 before loading the (weightless) teacher
    argv = ["eval", f"student={config_only_teacher}", f"teacher={config_only_teacher}"]
    assert main([*argv, "eval.top_p=1.5", f"output_dir={tmp_path / 'report'}"]) == 2
    assert "  eval.top_p=1.5: must be a number in (0, 1]" in capsys.readouterr().err.splitlines()
    scheme = OmegaConf.create({"embeddings": "yes", "exclude": ["mlp.("]})
    serving = OmegaConf.create({"limits": {"max_batch_size": 0, "max_tokens": 5}})
    with pytest.raises(ConfigError) as e:
        check_export("int4", scheme, serving)
    assert e.value.problems[:-1] == [
        "quant='int4': must be one of ['none', 'int8']",
        "quant.embeddings='yes': must be true or false",
        "quant.exclude='mlp.(': must be a regex (missing ), unterminated subpattern at position 4)",
        "serving.limits.max_batch_size=0: must be an integer ≥ 1",
    ]
    assert e.value.problems[-1].startswith("serving.limits.max_tokens=5: unknown; known: [")
    # the CLI: exit status 2, the lines on stderr, nothing written
    out = tmp_path / "export"
    argv = ["export", f"checkpoint={config_only_teacher}", f"output_dir={out}", "quant=int4"]
    assert main(argv) == 2
    assert "  quant='int4': must be one of ['none', 'int8']" in capsys.readouterr().err.splitlines()
    assert not out.exists()
