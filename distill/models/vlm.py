"""Idefics3 vision-language models: a teacher assembled from a Llama-family LM and a fresh
SigLIP-style vision tower, its processor, and per-part parameter counts.

The LM keeps its weights and tokenizer; the tokenizer gains Idefics3's image tokens and the
embedding table grows by their rows (mean-initialised by transformers' resize). The vision
tower and the pixel-shuffle connector start random and are trained on the VQA data.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

# ChatML (SmolLM2's turn format) without SmolLM2's default system prompt: 20 tokens a sample
# saved. Image items become `<image>`, which the processor expands into the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_seq_len(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Image tokens per tile: (image_size / patch_size)² patches, scale_factor² patches a token."""
    return (image_size // patch_size) ** 2 // scale_factor**2


def vlm_processor(tokenizer, image_size: int, patch_size: int, scale_factor: int):
    """An Idefics3 processor for `tokenizer` (image tokens added if missing): images resized so
    the longer side is `image_size`, one tile (no splitting) → image_seq_len tokens each."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from serve.images import image_special_tokens

    missing = [t for t in image_special_tokens() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    images = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    return Idefics3Processor(
        images,
        tokenizer,
        image_seq_len=image_seq_len(image_size, patch_size, scale_factor),
        chat_template=CHAT_TEMPLATE,
    )


def build_vlm(
    lm_name_or_path: str,
    vision: dict,
    scale_factor: int = 2,
    seed: int = 0,
    dtype: str = "float32",
):
    """(Idefics3ForConditionalGeneration, processor): the LM's weights and a random vision tower.

    `vision` holds Idefics3VisionConfig fields (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, image_size, patch_size).
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer = load_tokenizer(lm_name_or_path)
    processor = vlm_processor(tokenizer, vision["image_size"], vision["patch_size"], scale_factor)
    lm = load_causal_lm(lm_name_or_path, dtype)
    torch.manual_seed(seed)  # the new rows are sampled around the table's mean
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = lm.config.to_dict()
    tied = bool(lm.config.tie_word_embeddings)
    config = Idefics3Config(
        text_config=text_config,
        vision_config=dict(vision),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=tied,
    )
    model = Idefics3ForConditionalGeneration(config).to(lm.dtype)
    model.model.text_model.load_state_dict(lm.model.state_dict())
    if tied:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("vlm: %s", parameter_counts(model))
    return model, processor


def save_processor(processor, out_dir) -> None:
    """The processor, plus the image processor's own preprocessor_config.json (transformers 5
    folds it into processor_config.json; serve.images and the export read the separate file)."""
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters of the vision tower, connector, language model (with its head) and
    the whole model."""
    base = model.model
    return {
        "vision": count_parameters(base.vision_model),
        "connector": count_parameters(base.connector),
        "lm": count_parameters(model)
        - count_parameters(base.vision_model)
        - count_parameters(base.connector),
        "total": count_parameters(model),
    }
