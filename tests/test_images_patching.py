"""Adaptive patching: the documented token rule, and equality with transformers' Idefics3
processor (token ids and pixel values) on the real SmolLM2 tokenizer plus the image tokens."""

from __future__ import annotations

import pytest
import torch
from vlm_support import noise_image, with_image_tokens

from serve.images import PatchConfig, expand_prompt, image_token_count, plan, preprocess

SIZES = [(64, 64), (512, 384), (1500, 900)]  # width × height


@pytest.fixture(scope="module")
def tok(tokenizer):
    return with_image_tokens(tokenizer)


def processor(tok, cfg: PatchConfig, backend: str):
    from transformers import Idefics3ImageProcessor, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    cls = Idefics3ImageProcessorPil if backend == "pil" else Idefics3ImageProcessor
    images = cls(
        max_image_size={"longest_edge": cfg.tile_size}, size={"longest_edge": cfg.max_side}
    )
    return Idefics3Processor(images, tok, image_seq_len=cfg.tokens_per_tile)


# (tile T, tokens a tile S, longest edge M) → the rule's (rows, cols) and tokens per image, worked
# out by hand from the module docstring: one view costs S + 3, an r×c grid r·(c·(S+2)+1) + S + 3.
RULE = {
    (64, 16, 256): [((0, 0), 19), ((3, 4), 3 * (4 * 18 + 1) + 19), ((3, 4), 238)],
    (64, 16, 384): [((0, 0), 19), ((5, 6), 5 * (6 * 18 + 1) + 19), ((4, 6), 4 * 109 + 19)],
    (512, 64, 2048): [((0, 0), 67), ((0, 0), 67), ((2, 3), 2 * (3 * 66 + 1) + 67)],
}


@pytest.mark.parametrize("key", list(RULE))
def test_token_counts_follow_the_documented_rule(key):
    t, s, m = key
    cfg = PatchConfig(tile_size=t, tokens_per_tile=s, longest_edge=m)
    for (w, h), (grid, tokens) in zip(SIZES, RULE[key], strict=True):
        _, _, rows, cols = plan(h, w, cfg)
        assert (rows, cols) == grid and image_token_count(rows, cols, s) == tokens
    assert RULE[(64, 16, 256)][1][1] == 238  # the README's numbers
    with pytest.raises(ValueError, match="6×6"):  # Idefics3 tokenizers mark grids ≤ 6×6
        PatchConfig(tile_size=64, tokens_per_tile=16, longest_edge=7 * 64)


@pytest.mark.parametrize("longest", [256, 384])
def test_ids_and_pixels_equal_transformers_idefics3(tok, longest):
    cfg = PatchConfig(tile_size=64, tokens_per_tile=16, longest_edge=longest)
    procs = {b: processor(tok, cfg, b) for b in ("pil", "torchvision")}
    base = len(tok("User:hi", add_special_tokens=False)["input_ids"])
    for (w, h), (_, tokens) in zip(SIZES, RULE[(64, 16, longest)], strict=True):
        image = noise_image(w, h, seed=w)
        (mine,) = preprocess([image], cfg)
        ids = tok(expand_prompt("User:<image>hi", [mine]), add_special_tokens=False)["input_ids"]
        assert len(ids) - base == tokens
        size = {"longest_edge": min(max(w, h), longest)}  # never upscale: see serve/images.py
        for backend, proc in procs.items():
            ref = proc(text=["User:<image>hi"], images=[[image]], size=size, return_tensors="pt")
            assert ref["input_ids"][0].tolist() == ids, (backend, w, h)
            assert ref["pixel_values"].shape[1] == mine.views
        ref = procs["pil"](
            text=["User:<image>hi"], images=[[image]], size=size, return_tensors="pt"
        )
        torch.testing.assert_close(ref["pixel_values"][0], mine.pixel_values, atol=1e-6, rtol=0)


def test_two_images_in_one_prompt_equal_transformers(tok):
    cfg = PatchConfig(tile_size=64, tokens_per_tile=16, longest_edge=256)
    images = [noise_image(512, 384, 1), noise_image(900, 1500, 2)]  # both capped at 256
    patched = preprocess(images, cfg)
    text = "User:<image>left<image>right?<end_of_utterance>\nAssistant:"
    ids = tok(expand_prompt(text, patched), add_special_tokens=False)["input_ids"]
    ref = processor(tok, cfg, "pil")(text=[text], images=[images], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == ids
    pixels = torch.cat([p.pixel_values for p in patched])
    torch.testing.assert_close(ref["pixel_values"][0], pixels, atol=1e-6, rtol=0)
    assert [(p.rows, p.cols) for p in patched] == [(3, 4), (4, 3)]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 16 * 26
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        expand_prompt(text, patched[:1])
