"""Tiny Idefics3 exports for the image tests: the real SmolLM2 tokenizer plus Idefics3's image
tokens, a random 2-layer ViT (64×64 tiles, 16-pixel patches → 4 tokens a tile) and LM."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

from serve.export_format import Limits, ServingSpec
from serve.images import image_special_tokens

MODEL = "tiny-vlm"
TILE, PATCH, SCALE = 64, 16, 2
PER_TILE = (TILE // PATCH) ** 2 // SCALE**2  # 4 <image> tokens a tile
LONGEST_EDGE = 2 * TILE  # at most a 2×2 grid + the global view: 5 tiles, 20 image tokens

# Idefics3's turn format ("User:<image>What is it?<end_of_utterance>\nAssistant:"): image
# parts render as <image>, string content as it is.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def with_image_tokens(tokenizer):
    """A copy of `tokenizer` that knows Idefics3's image tokens as special tokens."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": image_special_tokens()})
    return tok


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_idefics3_config(vocab_size: int, image_token_id: int, **text):
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, **text),
        image_token_id=image_token_id, scale_factor=SCALE, tie_word_embeddings=False,
    )  # fmt: skip


def make_tiny_vlm_export(out: Path, tokenizer, chat_template: str = IDEFICS3_TEMPLATE,
                         **limits) -> Path:  # fmt: skip
    """A random tiny Idefics3 with `tokenizer` (image tokens added) as an export directory."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    tok = with_image_tokens(tokenizer)
    config = tiny_idefics3_config(len(tok), tok.convert_tokens_to_ids("<image>"),
                                  eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    pre = {"do_image_splitting": True, "size": {"longest_edge": LONGEST_EDGE},
           "max_image_size": {"longest_edge": TILE}, "image_mean": [0.5] * 3,
           "image_std": [0.5] * 3}  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    limits = {"max_output_tokens": 256, "max_concurrent_requests": 8, **limits}
    ServingSpec(model=MODEL, context_length=2048, chat_template=chat_template,
                limits=Limits(**limits)).save(out)  # fmt: skip
    return out
