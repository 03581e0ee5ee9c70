"""Images through the official openai client against a live server on a tiny random Idefics3:
several data: URLs (PNG, JPEG, WebP) in one message, token counts by the rule, and the
prefix cache keyed by image content."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from api_support import ENGINE, LiveServer
from vlm_support import (
    IDEFICS3_TEMPLATE,
    MODEL,
    PER_TILE,
    make_tiny_vlm_export,
    noise_image,
    with_image_tokens,
)

from serve.api import ServedModel, create_app
from serve.images import image_token_count


def data_url(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tokenizer, one_thread):
    out = make_tiny_vlm_export(tmp_path_factory.mktemp("vlm-export"), tokenizer)
    with LiveServer(create_app(ServedModel.load(out, **ENGINE))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_three_images_in_one_message(client, tokenizer):
    tok = with_image_tokens(tokenizer)
    images = [noise_image(64, 64, 1), noise_image(150, 100, 2), noise_image(100, 100, 3)]
    urls = [data_url(im, fmt) for im, fmt in zip(images, ("PNG", "JPEG", "WEBP"), strict=True)]
    reply = client.chat.completions.create(model=MODEL, messages=message("Which?", *urls),
                                           max_tokens=4, temperature=0)  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
    # Idefics3's template with the images' <image> markers, each replaced by the rule's count:
    # 64×64 → one view; 150×100 → 128×86 → 128×128, a 2×2 grid; 100×100 → 128×128, 2×2.
    parts = [{"type": "image"}] * 3 + [{"type": "text", "text": "Which?"}]
    text = tok.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                   chat_template=IDEFICS3_TEMPLATE, add_generation_prompt=True)  # fmt: skip
    assert text.count("<image>") == 3
    with_markers = len(tok(text, add_special_tokens=False)["input_ids"])
    per_image = [image_token_count(0, 0, PER_TILE)] + [image_token_count(2, 2, PER_TILE)] * 2
    assert per_image == [7, 33, 33]
    assert reply.usage.prompt_tokens == with_markers - 3 + sum(per_image)


def test_different_images_never_share_cached_blocks(client):
    text = "Describe the picture in a few words please, and say what colour it mostly is."
    first, other = noise_image(64, 64, 10), noise_image(64, 64, 11)  # same size and tokens

    def cached(image) -> tuple[int, int]:
        r = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                           messages=message(text, data_url(image, "PNG")))  # fmt: skip
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens

    cached(first)
    warm, prompt = cached(first)
    assert warm == (prompt - 1) // ENGINE["block_size"] * ENGINE["block_size"] and warm >= 16
    # The image comes first: "<|im_start|>User:" then <fake><global-img> and its 4 tokens
    # start within the first block, so a different image can reuse nothing.
    assert cached(other)[0] == 0
    assert cached(first)[0] == warm  # the first image's blocks are still cached
