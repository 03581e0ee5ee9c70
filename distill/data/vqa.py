"""easy-VQA for training vision-language models: questions as chat prompts with one image, the
answer as the only supervised tokens, images preprocessed once by the model's processor.

Splits: the package's train split minus a held-out `validation_images` (by image id, so no
validation image is trained on) for validation; its test split for evaluation only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.resumable import ResumableLoader
from distill.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("shape", "colour", "yes/no")


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image: Path
    image_id: int


def question_type(answer: str) -> str:
    """easy-VQA's three question kinds, told apart by their answer vocabulary."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def easy_vqa_split(split: str) -> list[VQAItem]:
    """Every question of the embedded easy-VQA `split` ('train' or 'test'), in package order."""
    from distill.assets import locate

    locate("easy-vqa")  # a clear MissingAssetError before the import when it is absent
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be train or test, got {split!r}")
    questions, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [
        VQAItem(q, a, Path(paths[i]), i) for q, a, i in zip(questions, answers, ids, strict=True)
    ]


def sample_items(items: list[VQAItem], count: int | None, seed: int = 0) -> list[VQAItem]:
    """A fixed random subset of `count` items (all of them, in order, when count is None)."""
    if count is None or count >= len(items):
        return list(items)
    order = random.Random(seed).sample(range(len(items)), count)
    return [items[i] for i in order]


def vqa_messages(question: str, instruction: str = "") -> list[dict]:
    """One user turn: the image, then the question (and an optional instruction)."""
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": question + instruction}],
        }
    ]


def load_rgb(path: Path):
    """The image at `path` as upright RGB (serve.images: the one decoder, limits included)."""
    from serve.images import load_image

    return load_image(path)


def patch_config(processor):
    """serve.images' patching for an Idefics3 processor's settings."""
    from serve.images import PatchConfig

    ip = processor.image_processor
    return PatchConfig(
        tile_size=ip.max_image_size["longest_edge"],
        tokens_per_tile=processor.image_seq_len,
        longest_edge=ip.size["longest_edge"],
        split=bool(ip.do_image_splitting),
        mean=tuple(ip.image_mean),
        std=tuple(ip.image_std),
    )


def pixel_values(processor, images: list) -> torch.Tensor:
    """[N, 3, T, T] normalised tiles, one per image (the recipes use one view per image)."""
    from serve.images import preprocess

    patched = preprocess(images, patch_config(processor))
    views = {p.views for p in patched}
    if views != {1}:
        raise ValueError(f"expected one view per image, patching made {sorted(views)}")
    return torch.cat([p.pixel_values for p in patched])


def blank_image(size: int):
    """White: after normalisation +1 everywhere (an all-zero tile is dropped as padding by HF)."""
    from PIL import Image

    return Image.new("RGB", (size, size), (255, 255, 255))


class PromptCache:
    """Token ids of the prompt for each distinct question (easy-VQA has about a hundred)."""

    def __init__(self, processor, instruction: str = ""):
        from serve.images import preprocess

        self.processor, self.instruction = processor, instruction
        self._ids: dict[str, list[int]] = {}
        size = processor.image_processor.size["longest_edge"]
        self._patched = preprocess([blank_image(size)], patch_config(processor))

    def prompt(self, question: str) -> str:
        return self.processor.apply_chat_template(
            vqa_messages(question, self.instruction), add_generation_prompt=True
        )

    def __call__(self, question: str) -> list[int]:
        from serve.images import expand_prompt

        if question not in self._ids:
            text = expand_prompt(self.prompt(question), self._patched)
            self._ids[question] = self.processor.tokenizer(text)["input_ids"]
        return self._ids[question]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer followed by the end-of-turn token (the model learns to stop)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]


class VQADataset(Dataset):
    """Right-padded (input_ids, attention_mask, labels) of fixed width + the image's tile.

    Labels are the unshifted answer tokens (IGNORE_INDEX elsewhere); the module shifts them.
    """

    def __init__(self, items, prompts: PromptCache, tiles: torch.Tensor, tile_index: dict):
        tok = prompts.processor.tokenizer
        rows = [(prompts(i.question), answer_ids(tok, i.answer)) for i in items]
        width = max(len(p) + len(a) for p, a in rows)
        n = len(items)
        self.input_ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
        self.labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        self.attention_mask = torch.zeros((n, width), dtype=torch.long)
        for r, (p, a) in enumerate(rows):
            ids = torch.tensor(p + a)
            self.input_ids[r, : len(ids)] = ids
            self.labels[r, len(p) : len(ids)] = torch.tensor(a)
            self.attention_mask[r, : len(ids)] = 1
        self.tiles = tiles
        self.tile_of = torch.tensor([tile_index[i.image_id] for i in items])

    def __len__(self) -> int:
        return len(self.tile_of)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "pixel_values": self.tiles[self.tile_of[i]][None],  # [1 image, 3, S, S]
        }


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the right-padding columns every row of the batch shares."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


class VQADataModule(L.LightningDataModule):
    """easy-VQA train / validation loaders for an Idefics3 processor (see module doc).

    `blank_images=True` replaces every image by one white tile: the blind baseline, which can
    only learn answer priors from the question.
    """

    def __init__(
        self,
        processor,
        batch_size: int = 16,
        validation_images: int = 100,
        max_validation_questions: int = 256,
        max_train_questions: int | None = None,
        instruction: str = "",
        blank_images: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.processor, self.batch_size, self.seed = processor, batch_size, seed
        self.validation_images, self.max_validation = validation_images, max_validation_questions
        self.max_train, self.instruction = max_train_questions, instruction
        self.blank_images, self.num_workers = blank_images, num_workers
        self.prompts = PromptCache(processor, instruction)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        items = easy_vqa_split("train")
        image_ids = sorted({i.image_id for i in items})
        held = set(random.Random(self.seed).sample(image_ids, self.validation_images))
        train = [i for i in items if i.image_id not in held]
        val = sample_items([i for i in items if i.image_id in held], self.max_validation, 0)
        train = sample_items(train, self.max_train, self.seed) if self.max_train else train
        tiles, index = self.tiles(train + val)
        self.train_items, self.tile_index = train, index
        self.train_set = VQADataset(train, self.prompts, tiles, index)
        self.val_set = VQADataset(val, self.prompts, tiles, index)
        log.info(
            "easy-VQA: %d train / %d validation questions, %d images%s",
            len(train),
            len(val),
            len(tiles),
            " (blank: blind baseline)" if self.blank_images else "",
        )

    def tiles(self, items: list[VQAItem]) -> tuple[torch.Tensor, dict[int, int]]:
        """Each distinct image preprocessed once: ([images, 3, S, S], image id → row)."""
        if self.blank_images:
            size = self.processor.image_processor.size["longest_edge"]
            tile = pixel_values(self.processor, [blank_image(size)])
            return tile, {i.image_id: 0 for i in items}
        paths = {i.image_id: i.image for i in items}
        ids = sorted(paths)
        images = [load_rgb(paths[i]) for i in ids]
        tiles = torch.cat([pixel_values(self.processor, images[k : k + 256]) for k in
                           range(0, len(images), 256)])  # fmt: skip
        return tiles, {image_id: row for row, image_id in enumerate(ids)}

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size * 2, shuffle=False)
