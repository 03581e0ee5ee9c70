"""VQA retention on easy-VQA (64×64 shape images, one-word answers): exact-match accuracy of a
vision-language model's greedy answers."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

# Without a chat template on the processor: Idefics3's own turn format.
_FALLBACK_PROMPT = "User:<image>{question} Answer with one word.<end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image: Path


def is_vlm(model_or_config) -> bool:
    """A model whose config carries a vision tower (Idefics3 / SmolVLM and kin)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


def easy_vqa_items(count: int, seed: int = 0) -> list[VQAItem]:
    """`count` test questions of the embedded easy-VQA asset, sampled with a fixed seed."""
    from distill.assets import locate

    locate("easy-vqa")  # a clear MissingAssetError before the import when it is absent
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    order = random.Random(seed).sample(range(len(questions)), min(count, len(questions)))
    return [VQAItem(questions[i], answers[i], Path(paths[image_ids[i]])) for i in order]


def normalize_answer(text: str) -> str:
    """Lower-cased first word without punctuation: 'Circle.' → 'circle'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def vqa_prompt(processor, question: str) -> str:
    """The processor's chat template with an image turn; Idefics3's own format when there is no
    template or it is a text-only one (a tokenizer's, which cannot place the image)."""
    if getattr(processor, "chat_template", None):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": f"{question} Answer with one word."},
                ],
            }
        ]
        try:
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        except TypeError:  # a text-only template concatenating the content list as a string
            prompt = ""
        if "<image>" in prompt:
            return prompt
    return _FALLBACK_PROMPT.format(question=question)


@torch.no_grad()
def answer_questions(
    model: nn.Module, processor, items: list[VQAItem], max_new_tokens: int = 4
) -> list[str]:
    """The model's greedy answer text for each item."""
    device = next(model.parameters()).device
    answers = []
    for item in items:
        image = Image.open(item.image).convert("RGB")
        inputs = processor(
            text=vqa_prompt(processor, item.question), images=[image], return_tensors="pt"
        ).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.decode(new, skip_special_tokens=True).strip())
    return answers


def exact_match_accuracy(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        raise ValueError("VQA accuracy needs at least one question")
    hits = sum(
        normalize_answer(p) == normalize_answer(a)
        for p, a in zip(predictions, answers, strict=True)
    )
    return hits / len(answers)
