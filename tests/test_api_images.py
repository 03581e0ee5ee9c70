"""Images through the API (FastAPI TestClient): every bad image is a 400 naming the part, a
text model refuses images, a text-only chat template still places them; then a normal request."""

from __future__ import annotations

import base64
import io

import pytest
from api_support import ENGINE
from fastapi.testclient import TestClient
from PIL import Image
from vlm_support import MODEL, make_tiny_vlm_export, noise_image, with_image_tokens

from serve.api import ServedModel, create_app
from serve.images import image_token_count

pytest_plugins = ["api_fixtures"]

LIMITS = {"max_images": 2, "max_image_bytes": 30_000, "max_image_pixels": 40_000}


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, *parts]}]


@pytest.fixture(scope="module")
def vlm_client(tmp_path_factory, tokenizer, one_thread):
    """A tiny VLM whose chat template is SmolLM2's text-only one (images go inline)."""
    out = make_tiny_vlm_export(tmp_path_factory.mktemp("vlm-text-template"), tokenizer,
                               chat_template=tokenizer.chat_template, **LIMITS)  # fmt: skip
    with TestClient(create_app(ServedModel.load(out, **ENGINE))) as c:
        yield c


def post(client, messages, model: str = MODEL, **body):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                      "max_tokens": 2, **body})  # fmt: skip


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_text_model_refuses_images(tiny_export, one_thread):
    served = ServedModel.load(tiny_export, **ENGINE)
    with TestClient(create_app(served)) as c:
        url = data_url(encode(noise_image(8, 8)))
        err = error(post(c, ask(image_part(url)), model="tiny"))
        assert err["code"] == "images_not_supported"
        assert err["param"] == "messages.0.content.1.image_url"
        assert "no vision encoder" in err["message"]


def test_bad_images_are_400s_naming_the_part(vlm_client):
    png = data_url(encode(noise_image(16, 16)))
    cases = [
        (ask(*[image_part(png)] * 3), "messages", "3 images in the request; this server "
         "accepts at most 2"),
        (ask(image_part(data_url(encode(noise_image(120, 120))))),  # ≈ 43 kB of noise
         "messages.0.content.1.image_url.url", "bytes is over the limit of 30000"),
        (ask(image_part(data_url(encode(Image.new("RGB", (300, 300)))))),
         "messages.0.content.1.image_url.url", "300×300 = 90000 pixels is over the limit"),
        (ask(image_part(png), image_part("data:image/png;base64,iVBORw0KGgo*")),
         "messages.0.content.2.image_url.url", "image 2: invalid base64"),
        (ask(image_part(data_url(b"GIF89a" + b"\0" * 20, "image/gif"))),
         "messages.0.content.1.image_url.url", "unsupported image type 'image/gif'"),
        (ask(image_part(data_url(encode(noise_image(16, 16), "GIF")))),
         "messages.0.content.1.image_url.url", "unsupported image type: GIF images"),
        (ask(image_part("https://example.com/cat.png")),
         "messages.0.content.1.image_url.url", "only data: URLs are accepted"),
        (ask(image_part(png), image_part(data_url(encode(noise_image(40, 40))[:300]))),
         "messages.0.content.2.image_url.url", "image 2: truncated PNG"),
        (ask({"type": "image_url"}), "messages.0.content.1.image_url", "needs image_url.url"),
        (ask({"type": "image_url", "image_url": "x.png"}),  # a string, not {url: …}
         "messages.0.content.1.image_url", "invalid value for 'messages.0.content.1.image_url'"),
    ]  # fmt: skip
    for messages, param, message in cases:
        err = error(post(vlm_client, messages))
        assert err["param"] == param and message in err["message"], err
        assert err["type"] == "invalid_request_error"
    r = post(vlm_client, ask(image_part(png)))  # the server still serves
    assert r.status_code == 200, r.text


def test_text_only_template_places_images_inline(vlm_client, tokenizer):
    tok = with_image_tokens(tokenizer)
    images = [noise_image(64, 64, 1), noise_image(150, 100, 2)]  # one view; a 2×2 grid
    parts = [image_part(data_url(encode(im, fmt))) for im, fmt in zip(images, ("PNG", "WEBP"),
                                                                      strict=True)]  # fmt: skip
    r = post(vlm_client, ask(*parts), temperature=0)
    assert r.status_code == 200, r.text
    text = tok.apply_chat_template([{"role": "user", "content": "What is it?<image><image>"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    markers = len(tok(text, add_special_tokens=False)["input_ids"])
    expected = markers - 2 + image_token_count(0, 0, 4) + image_token_count(2, 2, 4)
    assert r.json()["usage"]["prompt_tokens"] == expected
