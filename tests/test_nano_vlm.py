"""The nano-vlm recipe on a tiny teacher VLM: prune → KD → int8 → VQA eval → export; and the
message when no teacher exists."""

from __future__ import annotations

import json

import pytest
import torch

from distill.models.vlm import build_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 16,
}
TINY = [
    "student.vision.num_hidden_layers=2",
    "student.vision.hidden_size=32",
    "student.vision.intermediate_size=64",
    "student.params=null",
    "+student.lm.num_hidden_layers=2",
    "+student.lm.hidden_size=48",
    "student.calibration_batches=2",
    "vision_kd.steps=2",
    "vision_kd.batch_size=8",
    "data.max_train_questions=48",
    "data.validation_images=4",
    "data.max_validation_questions=8",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.precision=32-true",
    "quant.steps=1",
    "eval.questions=8",
    "eval.batch_size=4",
    "eval.examples=2",
    "logger=csv",
]


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("outputs")
    model, processor = build_vlm(str(tiny_teacher_dir), VISION, seed=0)
    out = root / "vlm-teacher" / "2026-01-01_00-00-00" / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return root


def test_recipe_prunes_distills_quantizes_evaluates_exports(tmp_path, teacher_root):
    from omegaconf import OmegaConf

    from distill.hydra_app import compose_recipe
    from distill.vlm_train import run

    run_dir = tmp_path / "run"
    cfg = compose_recipe("nano-vlm", [f"output_root={teacher_root}", *TINY])
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    run(cfg, run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["vqa"]) == {"teacher", "student", "student_int8"}
    assert "vision_kd" in saved["stage_seconds"]  # the pruned tower learned the teacher's tokens
    p = saved["parameters"]
    assert (
        p["student"]["vision"] < p["teacher"]["vision"] and p["student"]["lm"] < p["teacher"]["lm"]
    )
    assert p["student"]["connector"] == 32 * 4 * 48
    ret = saved["retention"]["student"]["overall"]
    acc = saved["vqa"]
    if acc["teacher"]["overall"]["accuracy"]:
        s, t = acc["student"]["overall"]["accuracy"], acc["teacher"]["overall"]["accuracy"]
        assert ret == pytest.approx(s / t)
    for d in ("student-init", "student", "student-qat", "export"):
        assert (run_dir / d / "config.json").is_file(), d
    q = json.loads((run_dir / "student-qat" / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized"
    assert (run_dir / "export" / "serving.json").is_file()
    assert (run_dir / "export" / "preprocessor_config.json").is_file()
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count("base64,") == 2 and "student_int8" in page
    # the serving runtime loads the export with its vision tower and runs an image prompt
    from serve.engine import Engine

    engine = Engine.from_pretrained(run_dir / "export", num_blocks=16, block_size=8)
    assert engine.vision is not None
    assert torch.isfinite(engine.vision(torch.zeros(1, 3, 64, 64))).all()


def test_missing_teacher_says_how_to_make_it(tmp_path, capsys):
    """The CLI path (Hydra app): a one-line error naming the teacher recipe, no traceback."""
    from distill.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipe=nano-vlm", f"output_root={tmp_path}", f"hydra.run.dir={tmp_path}/r"])
    message = str(exit_info.value.code)
    assert message.startswith("error: train: 1 invalid setting")
    assert "python -m distill train recipe=vlm-teacher" in message
    assert not (tmp_path / "r" / "student-init").exists()


def test_newest_non_blind_teacher_is_found(tmp_path):
    from omegaconf import OmegaConf

    from distill.validate import ConfigError
    from distill.vlm_student import find_teacher

    cfg = OmegaConf.create({"teacher": {"path": None}, "output_root": str(tmp_path)})
    with pytest.raises(ConfigError, match="recipe=vlm-teacher"):
        find_teacher(cfg)
    for stamp, blind in (("2026-01-01", False), ("2026-01-02", False), ("2026-01-03", True)):
        model = tmp_path / "vlm-teacher" / stamp / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        OmegaConf.save({"data": {"blank_images": blind}}, model.parent / "config.yaml")
    assert find_teacher(cfg) == tmp_path / "vlm-teacher" / "2026-01-02" / "model"
    cfg.teacher.path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no VLM there"):
        find_teacher(cfg)
