"""VQA retention on a tiny random Idefics3 built from a config in code, with the real easy-VQA
images and questions."""

from __future__ import annotations

import json

import pytest
import torch

from eval.vqa import (
    answer_questions,
    easy_vqa_items,
    exact_match_accuracy,
    is_vlm,
    normalize_answer,
    vqa_prompt,
)

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor():
    """Idefics3 processor: SmolLM2's tokenizer plus image tokens, 64-px images, no splitting
    → 4 image tokens per image (64/16 patches per side, pixel shuffle 2)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from distill.assets import TEACHER_NAME
    from distill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(TEACHER_NAME)  # a fresh copy: the processor adds tokens to it
    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS + rows})
    images = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64}
    )
    return Idefics3Processor(images, tokenizer, image_seq_len=4)


def tiny_idefics3(processor, seed: int, layers: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from distill.models.tiny import tiny_llama_config

    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    config = Idefics3Config(
        text_config=tiny_llama_config(
            vocab_size=len(tokenizer), num_hidden_layers=layers
        ).to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return Idefics3ForConditionalGeneration(config).eval()


def test_answer_normalisation_and_exact_match():
    assert normalize_answer(" Circle.") == "circle"
    assert normalize_answer("Yes, it is") == "yes"
    assert normalize_answer("...") == ""
    assert exact_match_accuracy(["Red", "blue!", "no"], ["red", "green", "no"]) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError):
        exact_match_accuracy([], [])


def test_easy_vqa_items_are_fixed_and_real():
    import easy_vqa

    items = easy_vqa_items(5, seed=0)
    assert items == easy_vqa_items(5, seed=0)
    assert all(i.image.is_file() and i.answer in easy_vqa.get_answers() for i in items)


def test_vlm_detection(processor, tiny_llama):
    assert is_vlm(tiny_idefics3(processor, 0, 1))
    assert not is_vlm(tiny_llama)


def test_answers_are_the_greedy_decode(processor):
    from PIL import Image

    model = tiny_idefics3(processor, 0, 2)
    item = easy_vqa_items(1, seed=3)[0]
    (answer,) = answer_questions(model, processor, [item], max_new_tokens=3)
    inputs = processor(
        text=vqa_prompt(processor, item.question),
        images=[Image.open(item.image).convert("RGB")],
        return_tensors="pt",
    )
    ids = inputs["input_ids"]
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4
    with torch.no_grad():
        for _ in range(3):  # full forward each step: no cache involved
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=inputs["pixel_values"],
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
            ).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    new = ids[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(new, skip_special_tokens=True).strip()


def test_evaluate_reports_vqa_for_vlms(tmp_path, processor):
    from eval.suite import EvalSettings, evaluate

    teacher = tiny_idefics3(processor, 0, 2)
    student = tiny_idefics3(processor, 1, 1)
    settings = EvalSettings(
        seq_len=32,
        blocks=1,
        probe_paragraphs=2,
        prompts=1,
        prompt_tokens=8,
        new_tokens=4,
        speed_prompts=1,
        speed_new_tokens=2,
        speed_repeats=1,
        vqa_questions=6,
        vqa_examples=6,
    )
    report = evaluate(
        settings, teacher, {"student": student}, processor.tokenizer, tmp_path, processor=processor
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    examples = saved["vqa_examples"]
    assert len(examples) == 6
    for name in ("teacher", "student"):
        direct = exact_match_accuracy([e[name] for e in examples], [e["answer"] for e in examples])
        assert saved["models"][name]["vqa_accuracy"] == pytest.approx(direct)
    t, s = (saved["models"][n]["vqa_accuracy"] for n in ("teacher", "student"))
    assert report["retention"]["vqa_accuracy"] == (pytest.approx(s / t) if t else None)
    page = (tmp_path / "report.html").read_text()
    assert "VQA examples" in page and page.count("data:image/png;base64,") >= 6 + 2
    with pytest.raises(ValueError, match="needs a processor"):
        evaluate(settings, teacher, {"student": student}, processor.tokenizer, tmp_path)


def test_cli_evaluates_saved_vlms(tmp_path, processor):
    """`python -m distill eval` on VLM directories: detected from the config, processor loaded
    from the teacher directory, VQA section in the report."""
    from distill.commands.eval import main

    dirs = {}
    for name, seed, layers in (("teacher", 0, 2), ("student", 1, 1)):
        dirs[name] = tmp_path / name
        tiny_idefics3(processor, seed, layers).save_pretrained(dirs[name])
        processor.save_pretrained(dirs[name])
    small = {
        "seq_len": 32,
        "blocks": 1,
        "probe_paragraphs": 2,
        "prompts": 1,
        "prompt_tokens": 8,
        "new_tokens": 4,
        "speed_prompts": 1,
        "speed_new_tokens": 2,
        "speed_repeats": 1,
        "vqa_questions": 4,
    }
    out = tmp_path / "report"
    args = [f"student={dirs['student']}", f"teacher={dirs['teacher']}", f"output_dir={out}"]
    assert main([*args, "eval=default", *(f"eval.{k}={v}" for k, v in small.items())]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student"}
    assert len(report["vqa_examples"]) == 4
    assert 0.0 <= report["models"]["student"]["vqa_accuracy"] <= 1.0
