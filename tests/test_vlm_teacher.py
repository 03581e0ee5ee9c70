"""The vlm-teacher recipe end to end on tiny models (a tiny random Llama with SmolLM2's real
tokenizer + a 2-layer ViT), the easy-VQA data path and the VQA scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.data.vqa import (
    VQADataModule,
    easy_vqa_split,
    question_type,
    trim_padding,
)
from distill.losses import IGNORE_INDEX
from distill.models.vlm import build_vlm, parameter_counts
from eval.vqa import accuracy_by_type, answer_questions, normalize_answer, retention, vqa_normalize

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 16,
}
TINY_OVERRIDES = [
    "teacher.vision.hidden_size=32",
    "teacher.vision.intermediate_size=64",
    "teacher.vision.num_hidden_layers=2",
    "teacher.vision.num_attention_heads=2",
    "teacher.vision.patch_size=16",
    "data.max_train_questions=48",
    "data.validation_images=4",
    "data.max_validation_questions=8",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "eval.questions=12",
    "eval.batch_size=4",
    "eval.examples=3",
    "logger=csv",
    "vision_pretrain.heads_steps=2",
    "vision_pretrain.words_steps=2",
    "vision_pretrain.batch_size=8",
]


@pytest.fixture(scope="module")
def tiny_vlm(tiny_teacher_dir):
    return build_vlm(str(tiny_teacher_dir), TINY_VISION, scale_factor=2, seed=0)


def test_build_vlm_keeps_the_lm_and_adds_image_tokens(tiny_vlm, tiny_teacher_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model, processor = tiny_vlm
    lm = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    added = len(processor.tokenizer) - len(tokenizer)
    assert added == 40  # 4 Idefics3 tokens + 36 row/column markers
    table = model.get_input_embeddings().weight
    assert table.shape[0] == len(processor.tokenizer)
    assert torch.equal(table[: len(tokenizer)], lm.get_input_embeddings().weight)
    assert model.get_output_embeddings().weight is table  # tied, like SmolLM2
    layer = "layers.1.mlp.down_proj.weight"
    assert torch.equal(model.model.text_model.state_dict()[layer], lm.model.state_dict()[layer])
    counts = parameter_counts(model)
    assert counts["connector"] == 32 * 4 * 64  # pixel shuffle 2×2 → 128 → LM width 64
    assert counts["vision"] + counts["connector"] + counts["lm"] == counts["total"]
    assert counts["lm"] == sum(p.numel() for p in lm.parameters()) + 40 * 64


def test_training_rows_supervise_only_the_answer(tiny_vlm):
    model, processor = tiny_vlm
    data = VQADataModule(processor, batch_size=4, validation_images=4, max_train_questions=16)
    data.setup()
    batch = trim_padding(next(iter(data.train_dataloader())))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        n = int(mask.sum())
        assert (ids == image_id).sum() == 4  # (64 / 16)² patches / 2² = 4 image tokens
        answer = tok.decode(labels[labels != IGNORE_INDEX])
        assert answer.endswith("<|im_end|>") and " " not in answer
        assert answer.removesuffix("<|im_end|>") in ("yes", "no", "circle", "red", "rectangle",
                                                     "triangle", "green", "blue", "black", "gray",
                                                     "teal", "brown", "yellow")  # fmt: skip
        assert tok.decode(ids[:n]).endswith("<|im_start|>assistant\n" + answer)
        assert (labels[n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (4, 1, 3, 64, 64)
    # one forward with the batch: answer rows only reach the loss
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_training_prompts_and_pixels_equal_the_hf_processor(tiny_vlm):
    """The data path (serve.images) and transformers' Idefics3 processor agree exactly."""
    from distill.data.vqa import PromptCache, load_rgb, pixel_values

    _, processor = tiny_vlm
    prompts = PromptCache(processor)
    items = easy_vqa_split("train")[:3]
    images = [load_rgb(i.image) for i in items]
    ours = pixel_values(processor, images)
    for item, image, tile in zip(items, images, ours, strict=True):
        ref = processor(text=prompts.prompt(item.question), images=[image], return_tensors="pt")
        assert ref["input_ids"][0].tolist() == prompts(item.question)
        assert (ref["pixel_values"][0, 0] - tile).abs().max() <= 1e-6


def test_validation_images_are_never_trained_on(tiny_vlm):
    _, processor = tiny_vlm
    data = VQADataModule(
        processor, validation_images=10, max_validation_questions=None, max_train_questions=300
    )
    data.setup()
    train = set(data.train_set.tile_of.tolist())
    val = set(data.val_set.tile_of.tolist())
    assert len(val) == 10 and not train & val


def test_blank_images_are_one_white_tile(tiny_vlm):
    _, processor = tiny_vlm
    data = VQADataModule(processor, validation_images=4, max_train_questions=8, blank_images=True)
    data.setup()
    assert data.train_set.tiles.shape == (1, 3, 64, 64)
    assert torch.all(data.train_set.tiles == 1.0)  # white → +1 after Idefics3's normalisation


def test_vqa_normalisation_and_types():
    assert vqa_normalize("The Circle.") == "circle"
    assert vqa_normalize("Two, dont!") == "2 don't"
    assert vqa_normalize("1,000 or 2.5") == "1000 or 2.5"
    assert normalize_answer("An  apple") == "apple"
    assert normalize_answer("Yes, it is") == "yes"
    assert [question_type(a) for a in ("no", "teal", "triangle")] == ["yes/no", "colour", "shape"]


def test_accuracy_by_type_and_retention():
    items = easy_vqa_split("test")[:40]
    gold = [i.answer for i in items]
    wrong_shapes = ["nope" if question_type(a) == "shape" else a.upper() + "." for a in gold]
    result = accuracy_by_type(wrong_shapes, items)
    n = {k: sum(question_type(a) == k for a in gold) for k in ("shape", "colour", "yes/no")}
    assert result["overall"] == {"accuracy": 1 - n["shape"] / 40, "questions": 40}
    assert result["shape"] == {"accuracy": 0.0, "questions": n["shape"]}
    assert result["yes/no"]["accuracy"] == 1.0
    teacher = accuracy_by_type(gold, items)
    ret = retention(teacher, result)
    assert ret["overall"] == pytest.approx(1 - n["shape"] / 40) and ret["shape"] == 0.0


def test_batched_answers_equal_one_at_a_time(tiny_vlm):
    """Left padding in a batch of different question lengths must not change any answer."""
    model, processor = tiny_vlm
    items = easy_vqa_split("test")[:6]
    assert len({len(i.question) for i in items}) > 1
    one = answer_questions(model.eval(), processor, items, max_new_tokens=3, instruction="")
    batched = answer_questions(model, processor, items, 3, instruction="", batch_size=6)
    assert batched == one
    blank = answer_questions(model, processor, items, 3, instruction="", batch_size=6, blank=True)
    assert len(blank) == 6


def test_recipe_trains_evaluates_and_reports(tmp_path, tiny_teacher_dir):
    from omegaconf import OmegaConf

    from distill.hydra_app import compose_recipe
    from distill.vlm_train import run

    run_dir = tmp_path / "run"
    overrides = [f"teacher.lm={tiny_teacher_dir}", f"run_dir={run_dir}", *TINY_OVERRIDES]
    cfg = compose_recipe("vlm-teacher", overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    summary = run(cfg, run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["vqa"]["teacher"]["overall"]["questions"] == 12
    assert set(saved["vqa"]) == {"teacher", "teacher (blank image)"}
    assert sum(v["questions"] for k, v in saved["vqa"]["teacher"].items()
               if k not in ("overall", "seconds")) == 12  # fmt: skip
    assert summary["parameters"]["teacher"]["vision"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(run_dir / "model")
    processor = AutoProcessor.from_pretrained(run_dir / "model")
    assert processor.image_seq_len == 4 and "<image>" in processor.tokenizer.get_vocab()
    assert model.config.vision_config.num_hidden_layers == 2
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "yes/no" in page
    # the frozen embedding table did not move; the trained ViT did
    built, _ = build_vlm(str(tiny_teacher_dir), TINY_VISION, seed=0)
    table = "model.text_model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[table], built.state_dict()[table])
    patch = "model.vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(model.state_dict()[patch], built.state_dict()[patch])


def test_freeze_names_parts(tiny_vlm):
    from distill.vlm_train import freeze_parts

    model, _ = tiny_vlm
    counts = freeze_parts(model, ["lm"])
    c = parameter_counts(model)
    assert counts == {"trainable": c["vision"] + c["connector"], "frozen": c["lm"]}
    with pytest.raises(ValueError, match="unknown part"):
        freeze_parts(model, ["eyes"])
    model.requires_grad_(True)


def test_report_lists_every_part(tmp_path):
    from eval.vqa_report import write_vqa_report

    item = easy_vqa_split("test")[0]
    summary = {
        "vqa": {"teacher": accuracy_by_type([item.answer], [item])},
        "parameters": {"teacher": {"vision": 1, "connector": 2, "lm": 3, "total": 6}},
        "examples": [{"image": str(item.image), "question": item.question,
                      "answer": item.answer, "teacher": item.answer}],
    }  # fmt: skip
    write_vqa_report(summary, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| teacher | 1.0000 (n=1) |" in md and "| teacher | 1 | 2 | 3 | 6 |" in md
    assert Path(tmp_path / "report.html").read_text().count("base64,") == 1


def test_image_attributes_read_off_the_answers():
    from distill.data.vqa import VQAItem
    from distill.vision_pretrain import COLOURS, image_attributes

    def item(q, a, i):
        return VQAItem(q, a, Path("x.png"), i)

    items = [
        item("what is the blue shape?", "circle", 0),
        item("is there not a red shape?", "no", 1),  # red is there
        item("does the image contain a triangle?", "yes", 1),
        item("does the image not contain a gray shape?", "yes", 2),  # gray is not: no label
        item("what color is the shape?", "teal", 3),
        item("is no red shape present?", "yes", 3),  # "no" negates: red is not there
    ]
    found = image_attributes(items)
    blue, red, teal = (COLOURS.index(c) for c in ("blue", "red", "teal"))
    assert found == {0: [0, blue], 1: [2, red], 2: [-1, -1], 3: [-1, teal]}
    real = image_attributes(easy_vqa_split("train"))
    labelled = torch.tensor(list(real.values()))
    assert len(real) == 4000 and (labelled >= 0).float().mean() > 0.9


def test_word_grounding_teaches_tower_and_connector_the_lm_words(tiny_vlm):
    """The `words` warm-up: image tokens regress onto the LM's embeddings of the colour word;
    on solid-colour tiles a few dozen steps make every image's tokens nearest its own colour
    word, and only the tower and connector move (the LM is the fixed vocabulary)."""
    import copy

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from distill.vision_pretrain import COLOURS, SHAPES, WordGrounding, word_embeddings

    model, processor = tiny_vlm
    model = copy.deepcopy(model)
    tok = processor.tokenizer
    table = model.get_input_embeddings().weight
    colours = word_embeddings(model, tok, COLOURS)
    red = tok(" red", add_special_tokens=False)["input_ids"]
    teal = tok(" teal", add_special_tokens=False)["input_ids"]
    assert len(red) == 1 and len(teal) == 2  # " teal" is two tokens: their mean
    assert torch.equal(colours[COLOURS.index("red")], table[red[0]].detach())
    assert torch.allclose(colours[COLOURS.index("teal")], table[teal].detach().mean(0))

    rgb = {"black": (-1, -1, -1), "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1)}
    labels = torch.tensor([[-1, COLOURS.index(c)] for c in rgb] * 2)  # shape unknown
    pixels = torch.tensor(list(rgb.values()) * 2).float()[:, :, None, None]
    pixels = pixels.expand(-1, 3, 64, 64).contiguous()
    lm_before = copy.deepcopy(model.model.text_model.state_dict())
    probe = WordGrounding(model, colours, word_embeddings(model, tok, SHAPES), lr=1e-2)
    with torch.no_grad():
        before = probe.word_logits(probe.tokens(pixels), colours).argmax(-1)
    assert not torch.equal(before, labels[:, 1])
    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, DataLoader(TensorDataset(pixels, labels), batch_size=8, shuffle=True))

    with torch.no_grad():
        tokens = probe.tokens(pixels)
    nearest = torch.nn.functional.cosine_similarity(tokens[:, :, None], colours, dim=-1).argmax(-1)
    assert torch.equal(nearest, labels[:, 1, None].expand_as(nearest))  # every token
    after = model.model.text_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in lm_before.items())


def test_word_grounding_puts_the_shape_on_its_best_token_and_the_colour_on_the_rest(tiny_vlm):
    """The loss is zero MSE exactly when one token (any one) is the shape word and every other
    token the colour word; a token set without the shape word pays for it."""
    from distill.vision_pretrain import COLOURS, SHAPES, WordGrounding, word_embeddings

    model, processor = tiny_vlm
    colours = word_embeddings(model, processor.tokenizer, COLOURS)
    shapes = word_embeddings(model, processor.tokenizer, SHAPES)

    class Fixed(WordGrounding):  # the loss on chosen connector outputs
        def tokens(self, pixels):
            return pixels

    probe = Fixed(model, colours, shapes)
    red, triangle = colours[COLOURS.index("red")], shapes[SHAPES.index("triangle")]
    labels = torch.tensor([[SHAPES.index("triangle"), COLOURS.index("red")]])

    def loss(tokens):
        with pytest.warns(UserWarning):  # self.log outside a Trainer
            return float(probe.training_step((tokens[None], labels), 0))

    right = torch.stack([red, red, triangle, red])
    moved = torch.stack([triangle, red, red, red])
    no_shape = torch.stack([red, red, red, red])
    ce_only = loss(right)
    assert loss(moved) == pytest.approx(ce_only)  # any token may carry the shape
    assert loss(no_shape) > ce_only + 0.5  # its shape token is far from " triangle"
    unknown = torch.tensor([[-1, COLOURS.index("red")]])
    with pytest.warns(UserWarning):
        colour_only = float(probe.training_step((no_shape[None], unknown), 0))
    assert colour_only < ce_only  # shape unknown: all red is right, no shape term
