"""VQA on easy-VQA (64×64 shape images, one-word answers): greedy short answers, VQAv2-style
answer normalisation, accuracy overall and per question type (shape / colour / yes-no), and
retention = student accuracy ÷ teacher accuracy.

Scoring: easy-VQA has one reference answer per question, so VQAv2's min(#humans/3, 1) becomes
exact match after normalisation. The normalised answer's first word is scored (answers are
single words; a model that keeps talking after the answer is judged on the answer).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.data.vqa import (
    QUESTION_TYPES,
    VQAItem,
    blank_image,
    easy_vqa_split,
    load_rgb,
    question_type,
    sample_items,
    vqa_messages,
)

__all__ = ["VQAItem", "QUESTION_TYPES", "question_type"]

# Without a chat template on the processor: Idefics3's own turn format.
_FALLBACK_PROMPT = "User:<image>{question}{instruction}<end_of_utterance>\nAssistant:"
DEFAULT_INSTRUCTION = " Answer with one word."

# VQAv2's evaluation normalisation (Antol et al. 2015; the official vqaEval rules, rewritten).
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "thats": "that's",
    "whats": "what's",
}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
_COMMA_NUMBER = re.compile(r"(\d),(\d)")  # 1,000 → 1000


def vqa_normalize(text: str) -> str:
    """VQAv2 answer normalisation: lower case, punctuation dropped (commas inside numbers
    joined), number words as digits, articles removed, common contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\2", text)
    text = _PERIOD.sub("", _PUNCT.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The first word of the VQAv2-normalised answer: 'The Circle.' → 'circle'."""
    words = vqa_normalize(text).split()
    return words[0] if words else ""


def is_vlm(model_or_config) -> bool:
    """A model whose config carries a vision tower (Idefics3 / SmolVLM and kin)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


def easy_vqa_items(count: int | None, seed: int = 0) -> list[VQAItem]:
    """`count` test questions of the embedded easy-VQA asset, sampled with a fixed seed
    (None: all 9,673 in package order)."""
    return sample_items(easy_vqa_split("test"), count, seed)


def vqa_prompt(processor, question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The processor's chat template with an image turn; Idefics3's own format when there is no
    template or it is a text-only one (a tokenizer's, which cannot place the image)."""
    if getattr(processor, "chat_template", None):
        try:
            prompt = processor.apply_chat_template(
                vqa_messages(question, instruction), add_generation_prompt=True
            )
        except TypeError:  # a text-only template concatenating the content list as a string
            prompt = ""
        if "<image>" in prompt:
            return prompt
    return _FALLBACK_PROMPT.format(question=question, instruction=instruction)


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    processor,
    items: list[VQAItem],
    max_new_tokens: int = 4,
    instruction: str = DEFAULT_INSTRUCTION,
    batch_size: int = 1,
    blank: bool = False,
    progress: bool = False,
) -> list[str]:
    """The model's greedy answer text for each item, `batch_size` prompts at a time
    (left-padded). `blank` replaces every image with a white one (does the model look?)."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    size = processor.image_processor.size["longest_edge"]
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="vqa", disable=not progress):
            chunk = items[start : start + batch_size]
            images = [blank_image(size) if blank else load_rgb(i.image) for i in chunk]
            prompts = [vqa_prompt(processor, i.question, instruction) for i in chunk]
            enc = processor(
                text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True
            ).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match_accuracy(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        raise ValueError("VQA accuracy needs at least one question")
    hits = sum(
        normalize_answer(p) == normalize_answer(a)
        for p, a in zip(predictions, answers, strict=True)
    )
    return hits / len(answers)


def accuracy_by_type(predictions: list[str], items: list[VQAItem]) -> dict[str, dict]:
    """{"overall" | shape | colour | yes/no: {"accuracy", "questions"}} (types with no
    question are left out)."""
    gold = [i.answer for i in items]
    out = {"overall": {"accuracy": exact_match_accuracy(predictions, gold), "questions": len(gold)}}
    for kind in QUESTION_TYPES:
        idx = [k for k, a in enumerate(gold) if question_type(a) == kind]
        if idx:
            out[kind] = {
                "accuracy": exact_match_accuracy(
                    [predictions[k] for k in idx], [gold[k] for k in idx]
                ),
                "questions": len(idx),
            }
    return out


def retention(teacher: dict[str, dict], student: dict[str, dict]) -> dict[str, float | None]:
    """Student accuracy ÷ teacher accuracy per type (None where the teacher scored 0)."""
    return {
        k: (student[k]["accuracy"] / teacher[k]["accuracy"] if teacher[k]["accuracy"] else None)
        for k in teacher
        if isinstance(teacher[k], dict) and k in student
    }
