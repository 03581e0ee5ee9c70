"""A chat request's `image_url` parts → prompt ids with each image's tokens, pixel values and
the prefix-cache spans. Decoding and tiling are serve/images.py's; this module maps its
errors to OpenAI error objects that name the part (`messages.0.content.1.image_url.url`).

The chat template sees image parts as `{"type": "image"}` (as transformers' processors pass
them), so an Idefics3-style template writes `<image>` where each image goes; a text-only
template gets string content with `<image>` inline instead. Each marker is then replaced by
the image's tiles and row/column markers, and the whole text is tokenized once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.api.errors import APIError, invalid
from serve.chat_template import ChatTemplateError
from serve.images import (
    IMAGE_TOKEN,
    ImageError,
    ImageLimits,
    decode_data_url,
    expand_prompt,
    load_image,
    preprocess,
)
from serve.prefix_cache import ImageSpan, image_digest


@dataclass
class ChatImages:
    prompt_ids: list[int]
    pixel_values: torch.Tensor  # [views, 3, T, T], every image's views in prompt order
    spans: list[ImageSpan]  # per image: its placeholder tokens and the hash of its pixels


def image_params(req) -> list[str]:
    """The `param` path of every image part, in prompt order (empty for a text request)."""
    return [f"messages.{i}.content.{j}.image_url"
            for i, m in enumerate(req.messages) if isinstance(m.content, list)
            for j, p in enumerate(m.content) if p.type == "image_url"]  # fmt: skip


def _limits(model) -> ImageLimits:
    lim = model.spec.limits
    return ImageLimits(lim.max_image_bytes, lim.max_image_pixels, lim.max_images)


def _decode(req, params: list[str], limits: ImageLimits) -> list:
    if len(params) > limits.max_images:
        raise invalid(f"{len(params)} images in the request; this server accepts at most "
                      f"{limits.max_images}", "messages", "too_many_images")  # fmt: skip
    parts = [p for m in req.messages if isinstance(m.content, list)
             for p in m.content if p.type == "image_url"]  # fmt: skip
    images = []
    for pos, (part, param) in enumerate(zip(parts, params, strict=True), start=1):
        if part.image_url is None:
            raise invalid(f"image {pos}: an image_url part needs image_url.url", param,
                          "missing_required_parameter")  # fmt: skip
        try:
            data = decode_data_url(part.image_url.url, pos, limits)
            images.append(load_image(data, pos, limits))
        except ImageError as e:
            raise invalid(str(e), f"{param}.url", "invalid_image") from e
    return images


def _message(m, content) -> dict:
    return {"role": m.role, "content": content, **({"name": m.name} if m.name else {})}


def _as_parts(m) -> list[dict]:
    """The content as a part list, image_url parts as `{"type": "image"}`."""
    if not isinstance(m.content, list):
        return [{"type": "text", "text": m.content or ""}]
    image, text = {"type": "image"}, lambda p: {"type": "text", "text": p.text or ""}
    return [image if p.type == "image_url" else text(p) for p in m.content]


def _as_string(m) -> str | None:
    """The content as a string, `<image>` where each image goes."""
    if not isinstance(m.content, list):
        return m.content
    return "".join(IMAGE_TOKEN if p.type == "image_url" else p.text or "" for p in m.content)


def _render(req, model, n_images: int) -> str:
    """The prompt text with one `<image>` marker per image, in order."""
    template = model.chat_template
    try:
        text = template.render([_message(m, _as_parts(m)) for m in req.messages])
        if text.count(IMAGE_TOKEN) == n_images:
            return text
    except (ChatTemplateError, TypeError):
        pass  # a text-only template: content must be a string
    try:
        text = template.render([_message(m, _as_string(m)) for m in req.messages])
    except ChatTemplateError as e:
        raise invalid(str(e), "messages") from e
    if text.count(IMAGE_TOKEN) != n_images:
        raise invalid(f"the prompt has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers for "
                      f"{n_images} images (is '{IMAGE_TOKEN}' in a text part?)", "messages")  # fmt: skip
    return text


def chat_images(req, model) -> ChatImages:
    """Decode, tile and tokenize a chat request that has image parts (blocking: run it off the
    event loop). APIError (400) for a model without a vision tower or a bad image."""
    params = image_params(req)
    vision, patching = model.engine.vision, model.patching
    if vision is None or patching is None:
        raise APIError(400, f"model '{model.name}' has no vision encoder; send text only",
                       params[0], "images_not_supported")  # fmt: skip
    images = _decode(req, params, _limits(model))
    patched = preprocess(images, patching)
    ids = model.encode(expand_prompt(_render(req, model, len(images)), patched),
                       add_special_tokens=False)  # fmt: skip
    image_id = vision.args.image_token_id
    positions = [k for k, t in enumerate(ids) if t == image_id]
    need = [p.views * patching.tokens_per_tile for p in patched]
    if len(positions) != sum(need):
        raise invalid(f"the prompt tokenizes to {len(positions)} image tokens where the images "
                      f"need {sum(need)}: the tokenizer must know {IMAGE_TOKEN} as one token",
                      "messages", "invalid_image")  # fmt: skip
    spans, k = [], 0
    for p, n in zip(patched, need, strict=True):
        digest = image_digest(p.pixel_values.numpy().tobytes())
        spans.append(ImageSpan(positions[k], positions[k + n - 1] + 1, digest))
        k += n
    return ChatImages(ids, torch.cat([p.pixel_values for p in patched]), spans)
