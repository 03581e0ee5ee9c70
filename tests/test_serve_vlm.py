"""serve's Idefics3 vision encoder + connector + Llama decoder vs transformers on a tiny random VLM."""

from __future__ import annotations

import pytest
import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from serve.engine import Engine
from serve.sampler import SamplingParams

IMAGE_TOKEN = 300
PER_IMAGE = 4  # (64 / 16)² patches / 2² pixel shuffle


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=64, patch_size=16,
        ),
        text_config=dict(
            model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2,
        ),
        image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    out = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(out)
    return out, model


def prompt_with_images(n_images: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 290, (30,), generator=g).tolist()
    return text[:10] + [IMAGE_TOKEN] * (PER_IMAGE * n_images) + text[10:]


def test_logits_with_images_match_transformers(vlm):
    path, ref = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt = prompt_with_images(2)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    req = engine.add_request(prompt, params, pixel_values=pixels)
    while engine.has_work():
        engine.step()
    (done,) = Engine.collect(req)
    full = torch.tensor([prompt + done.token_ids])
    with torch.no_grad():
        logits = ref(input_ids=full, pixel_values=pixels[None]).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    assert done.token_ids == logp.argmax(-1).tolist()
    chosen = logp[torch.arange(6), torch.tensor(done.token_ids)]
    assert (chosen - torch.tensor(done.logprobs)).abs().max() <= 1e-4
    # The vision tower alone: image embeddings equal transformers' image features.
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels[None]).pooler_output[0]
    assert (engine.vision(pixels).flatten(0, 1) - expected).abs().max() <= 1e-4


def test_image_bytes_are_part_of_the_prefix_cache_key(vlm):
    path, _ = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    prompt = prompt_with_images(1)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(max_tokens=3, temperature=0)

    def run(px):
        req = engine.add_request(prompt, greedy, pixel_values=px)
        while engine.has_work():
            engine.step()
        return Engine.collect(req)[0]

    cold, warm = run(pixels), run(pixels)
    assert cold.usage["cached_tokens"] == 0 and warm.usage["cached_tokens"] == 32
    assert warm.token_ids == cold.token_ids
    changed = pixels.clone()
    changed[0, 0, 0, 0] += 1.0
    assert run(changed).usage["cached_tokens"] == 8  # only the block before the image is shared
    with pytest.raises(ValueError, match="image tokens"):
        engine.add_request(prompt, greedy, pixel_values=torch.randn(2, 3, 64, 64))
